"""Fixes for ChatGLM's remote config and model classes (docs/transformers-breakages.md, 4-7;
the CUDA-only quantization path, 19)."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch

from glm_portable.errors import UserError

from .registry import since_transformers, MARK, Context, Decision, Patch, Replacements
from .remote_classes import config_classes, model_classes, own, source_of

# Generation fields the remote code reads from its config. use_cache keeps config.json's value (4.x
# kept it); max_length only names a limit the code stores, and must stay None, since generate() on
# 5.x refuses a config that carries generation settings.
GENERATION_FIELDS = {"use_cache": True, "max_length": None}


def _config_fields_missing(cls: type) -> list[str]:
    source = source_of(own(cls, "__init__"))
    return [name for name in GENERATION_FIELDS if f"self.{name} =" not in source]


def _config_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "5.0", [cls for cls in config_classes(module) if _config_fields_missing(cls)],
        absent="no remote config class, or it sets use_cache and max_length itself",
        older="keeps generation fields on configs",
        needed="{classes} relies on PretrainedConfig for use_cache / max_length, "
               "which transformers 5 no longer keeps")


def _config_fields(ctx: Context, module: ModuleType) -> Replacements:
    return [(cls, "__init__", _with_generation_fields(own(cls, "__init__"))) for cls in config_classes(module)
            if _config_fields_missing(cls)]


def _with_generation_fields(original: Any) -> Any:
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if "use_cache" not in self.__dict__:
            self.use_cache = kwargs.get("use_cache", GENERATION_FIELDS["use_cache"])
        if "max_length" not in self.__dict__:
            self.max_length = GENERATION_FIELDS["max_length"]

    return __init__


CONFIG_GENERATION_FIELDS = Patch(
    name="config-generation-fields", target="ChatGLMConfig.__init__",
    symptom="AttributeError: 'ChatGLMConfig' object has no attribute 'use_cache' / 'max_length'",
    needed=_config_needed, replacements=_config_fields)


def _never_post_init(module: ModuleType) -> list[type]:
    return [cls for cls in model_classes(module)
            if own(cls, "__init__") is not None and "post_init(" not in source_of(own(cls, "__init__"))]


def _post_init_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "5.0", _never_post_init(module),
        absent="no remote model class, or every one calls post_init()",
        older="works without post_init()",
        needed="{classes} never call post_init(), which transformers 5 needs "
               "(all_tied_weights_keys)")


def _post_init(ctx: Context, module: ModuleType) -> Replacements:
    return [(cls, "__init__", _post_init_after(own(cls, "__init__"))) for cls in _never_post_init(module)]


def _post_init_after(original: Any) -> Any:
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if vars(_outermost_patched(type(self)))["__init__"] is __init__:
            self.post_init()

    return __init__


def _outermost_patched(cls: type) -> type | None:
    """The most derived class whose __init__ this patch wraps: post_init() runs once, after it.
    transformers may subclass the remote class with a copy of its namespace (to add GenerationMixin),
    so the wrapper is recognised by identity, not by the class it was made for."""
    return next((c for c in cls.__mro__ if getattr(vars(c).get("__init__"), MARK, None) == "model-post-init"), None)


MODEL_POST_INIT = Patch(
    name="model-post-init", target="ChatGLM*Model.__init__",
    symptom="AttributeError: 'ChatGLMForConditionalGeneration' object has no attribute 'all_tied_weights_keys'",
    needed=_post_init_needed, replacements=_post_init)


def _legacy_checkpointing(module: ModuleType) -> list[type]:
    out = []
    for cls in model_classes(module):
        method = own(cls, "_set_gradient_checkpointing")
        if method is not None and "value" in inspect.signature(method).parameters:
            out.append(cls)
    return out


def _checkpointing_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _legacy_checkpointing(module)]
    if not classes:
        return Decision(False, "no _set_gradient_checkpointing(module, value) override", present=False)
    if ctx.at_least("transformers", "4.35") and ctx.below("transformers", "4.35.3"):
        return Decision(True, f"{', '.join(classes)}._set_gradient_checkpointing takes (module, value); "
                              "transformers 4.35.0-4.35.2 call it with enable=")
    return Decision(False, f"transformers {ctx.versions['transformers']} calls the (module, value) form itself")


def _checkpointing(ctx: Context, module: ModuleType) -> Replacements:
    return [(cls, "_set_gradient_checkpointing", _accepting_enable(own(cls, "_set_gradient_checkpointing")))
            for cls in _legacy_checkpointing(module)]


def _accepting_enable(original: Any) -> Any:
    def _set_gradient_checkpointing(self, module=None, value=False, enable=None, gradient_checkpointing_func=None):
        if enable is None:
            return original(self, module, value)
        for child in self.modules():
            original(self, child, enable)

    return _set_gradient_checkpointing


GRADIENT_CHECKPOINTING_ENABLE = Patch(
    name="gradient-checkpointing-enable", target="ChatGLMPreTrainedModel._set_gradient_checkpointing",
    symptom="TypeError: _set_gradient_checkpointing() got an unexpected keyword argument 'enable'",
    needed=_checkpointing_needed, replacements=_checkpointing)


def _quantizing(module: ModuleType) -> list[type]:
    return [cls for cls in model_classes(module) if callable(own(cls, "quantize"))]


def _quantize_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _quantizing(module)]
    if not classes:
        return Decision(False, "no quantize() method", present=False)
    if ctx.backend == "cuda":
        return Decision(False, "int4/int8 kernels (cpm_kernels) run on CUDA")
    return Decision(True, f"{', '.join(classes)}.quantize() runs CUDA-only kernels (cpm_kernels, the current "
                          f"CUDA device); refused with a clear message on {ctx.backend}")


def _refuse_quantize(ctx: Context, module: ModuleType) -> Replacements:
    def quantize(self, bits, *args, **kwargs):
        raise UserError(f"this model's int{bits} quantization (quantization.py, quantization_bit) runs CUDA-only "
                        f"kernels and cannot run on {ctx.backend}; use unquantized weights (quantization_bit 0) "
                        "there, or --device cuda")

    return [(cls, "quantize", quantize) for cls in _quantizing(module)]


QUANTIZATION_CUDA_ONLY = Patch(
    name="quantization-cuda-only", target="ChatGLMForConditionalGeneration.quantize",
    symptom="errors from cpm_kernels or the CUDA runtime when quantization_bit is set off CUDA",
    needed=_quantize_needed, replacements=_refuse_quantize)

def _prompting(module: ModuleType) -> list[type]:
    return [cls for cls in model_classes(module) if "self.prefix_tokens" in source_of(own(cls, "get_prompt"))]


def _prefix_tokens_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "5.0", _prompting(module),
        absent="no get_prompt reading self.prefix_tokens",
        older="builds models on a real device",
        needed="{classes} keep prefix_tokens as a plain tensor attribute, which stays on the "
               "meta device when transformers 5 builds the model there")


def _prefix_tokens(ctx: Context, module: ModuleType) -> Replacements:
    return [(cls, "get_prompt", _materialised_prefix_tokens(own(cls, "get_prompt"))) for cls in _prompting(module)]


def _materialised_prefix_tokens(original: Any) -> Any:
    def get_prompt(self, *args, **kwargs):
        if self.prefix_tokens.is_meta:
            self.prefix_tokens = torch.arange(self.pre_seq_len, dtype=torch.long)
        return original(self, *args, **kwargs)

    return get_prompt


PREFIX_TOKENS_ON_META = Patch(
    name="prefix-tokens-on-meta", target="ChatGLMModel.get_prompt",
    symptom="NotImplementedError: Cannot copy out of meta tensor (P-Tuning prefix on transformers 5)",
    needed=_prefix_tokens_needed, replacements=_prefix_tokens)

MODEL_PATCHES = (CONFIG_GENERATION_FIELDS, MODEL_POST_INIT, PREFIX_TOKENS_ON_META, GRADIENT_CHECKPOINTING_ENABLE,
                 QUANTIZATION_CUDA_ONLY)
