"""Fixes for ChatGLM's remote generation code (docs/transformers-breakages.md, 9-15)."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessorList

from .registry import since_transformers, Context, Decision, Patch, Replacements
from .remote_classes import generation_classes, own, source_of


def _tuple_cache_classes(module: ModuleType) -> list[type]:
    """Generating models whose code keeps tuple caches (and injects the P-Tuning prefix when none exists)."""
    return [cls for cls in generation_classes(module)
            if "Cache" not in source_of(module) and own(cls, "_supports_default_dynamic_cache") is None]


def _tuple_cache_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "5.0", _tuple_cache_classes(module),
        absent="no generating model with tuple caches",
        older="passes no Cache object to remote code",
        needed="generate() hands {classes} an empty Cache object: the P-Tuning prefix is "
               "never injected and the sequence-first tuple layout breaks")


def _tuple_cache(ctx: Context, module: ModuleType) -> Replacements:
    def _supports_default_dynamic_cache(*args) -> bool:
        """The model keeps its own tuple cache: generate() starts it with None, as 4.x did."""
        return False

    return [(cls, "_supports_default_dynamic_cache", _supports_default_dynamic_cache)
            for cls in _tuple_cache_classes(module)]


GENERATION_TUPLE_CACHE = Patch(
    name="generation-tuple-cache", target="ChatGLMForConditionalGeneration._supports_default_dynamic_cache",
    symptom="generation ignores the P-Tuning prefix or fails on a DynamicCache ('tuple' / index errors)",
    needed=_tuple_cache_needed, replacements=_tuple_cache)


def _extracting(module: ModuleType) -> list[type]:
    return [cls for cls in generation_classes(module)
            if "_extract_past_from_model_output" in source_of(own(cls, "_update_model_kwargs_for_generation"))
            and own(cls, "_extract_past_from_model_output") is None]


def _extract_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "4.42", _extracting(module),
        absent="the cache update does not call _extract_past_from_model_output",
        older="has the original helper",
        needed="{classes} update the cache through _extract_past_from_model_output, which "
               "returns (name, cache) from 4.42, drops standardize_cache_format in 4.44, is gone in 4.49")


def _extract(ctx: Context, module: ModuleType) -> Replacements:
    def _extract_past_from_model_output(self, outputs, standardize_cache_format=False):
        """The cache alone, as the remote cache update expects."""
        return getattr(outputs, "past_key_values", None)

    return [(cls, "_extract_past_from_model_output", _extract_past_from_model_output) for cls in _extracting(module)]


GENERATION_EXTRACT_PAST = Patch(
    name="generation-extract-past", target="ChatGLMForConditionalGeneration._extract_past_from_model_output",
    symptom="'str' object has no attribute 'shape'; unexpected keyword 'standardize_cache_format'; "
            "no attribute '_extract_past_from_model_output'",
    needed=_extract_needed, replacements=_extract)


def _warping(module: ModuleType) -> list[type]:
    return [cls for cls in generation_classes(module) if "_get_logits_warper(" in source_of(cls)]


def _warper_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "4.42", _warping(module),
        absent="no custom loop calling _get_logits_warper",
        older="has _get_logits_warper(generation_config)",
        needed="{classes} call _get_logits_warper(generation_config): it needs a device "
               "from 4.42 and is gone from 4.45, when the processors took over warping")


def _warper(ctx: Context, module: ModuleType) -> Replacements:
    from transformers import GenerationMixin

    library = getattr(GenerationMixin, "_get_logits_warper", None)

    def _get_logits_warper(self, generation_config, device=None):
        """4.42-4.44: the library's, with the device; 4.45 on: nothing left to add, since
        _get_logits_processor already holds temperature / top-k / top-p."""
        if library is None:
            return LogitsProcessorList()
        return library(self, generation_config, device=device if device is not None else self.device)

    return [(cls, "_get_logits_warper", _get_logits_warper) for cls in _warping(module)]


GENERATION_LOGITS_WARPER = Patch(
    name="generation-logits-warper", target="ChatGLMForConditionalGeneration._get_logits_warper",
    symptom="_get_logits_warper() missing 1 required positional argument: 'device'; or no attribute "
            "'_get_logits_warper' (stream_chat)",
    needed=_warper_needed, replacements=_warper)


def _custom_loops(module: ModuleType) -> list[type]:
    return [cls for cls in generation_classes(module)
            if "_get_logits_processor(" in source_of(cls) and "_prepare_special_tokens" not in source_of(cls)]


def _eos_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "4.43", _custom_loops(module),
        absent="no custom loop building its own logits processors",
        older="processors read eos_token_id directly",
        needed="{classes} build processors outside generate(), so the "
               "generation config lacks _eos_token_tensor (4.43 on)")


def _eos(ctx: Context, module: ModuleType) -> Replacements:
    from transformers import GenerationMixin

    library = GenerationMixin._get_logits_processor
    accepts_device = "device" in inspect.signature(library).parameters

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        """Prepare the special-token tensors first, as generate() does before building processors."""
        if getattr(generation_config, "_eos_token_tensor", None) is None:
            self._prepare_special_tokens(generation_config, device=self.device)
        if accepts_device:
            kwargs.setdefault("device", self.device)
        return library(self, generation_config, *args, **kwargs)

    return [(cls, "_get_logits_processor", _get_logits_processor) for cls in _custom_loops(module)]


GENERATION_EOS_TENSOR = Patch(
    name="generation-eos-token-tensor", target="ChatGLMForConditionalGeneration._get_logits_processor",
    symptom="'GenerationConfig' object has no attribute '_eos_token_tensor' (stream_chat with bad_words_ids); "
            "min_length / min_new_tokens silently ignored",
    needed=_eos_needed, replacements=_eos)

def _mask_updating(module: ModuleType) -> list[type]:
    return [cls for cls in generation_classes(module)
            if 'model_kwargs["attention_mask"]' in source_of(own(cls, "_update_model_kwargs_for_generation"))]


def _library_drops_full_masks() -> bool:
    import transformers.generation.utils as generation

    return 'model_kwargs["attention_mask"] = None' in source_of(generation)


def _mask_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _mask_updating(module)]
    if not classes:
        return Decision(False, "the cache update does not extend the attention mask itself", present=False)
    if not _library_drops_full_masks():
        return Decision(False, f"transformers {ctx.versions['transformers']} keeps all-ones attention masks")
    return Decision(True, f"{', '.join(classes)} extend model_kwargs['attention_mask'], which generate() now sets "
                          "to None when it holds no padding")


def _mask(ctx: Context, module: ModuleType) -> Replacements:
    name = "_update_model_kwargs_for_generation"
    return [(cls, name, _without_dropped_mask(own(cls, name))) for cls in _mask_updating(module)]


def _without_dropped_mask(original: Any) -> Any:
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """A mask generate() dropped (None: no padding) is left out, as if never given."""
        if "attention_mask" in model_kwargs and model_kwargs["attention_mask"] is None:
            del model_kwargs["attention_mask"]
        return original(self, outputs, model_kwargs, *args, **kwargs)

    return _update_model_kwargs_for_generation


GENERATION_DROPPED_MASK = Patch(
    name="generation-dropped-attention-mask",
    target="ChatGLMForConditionalGeneration._update_model_kwargs_for_generation",
    symptom="AttributeError: 'NoneType' object has no attribute 'new_ones' (chat without padding)",
    needed=_mask_needed, replacements=_mask)


def _library_source_has(text: str) -> bool:
    import transformers.generation.utils as generation

    return text in source_of(generation)


def _two_row_positions(module: ModuleType) -> list[type]:
    """ChatGLM-6B models: their attention reads ``position_ids[:, 0, :]`` and ``[:, 1, :]`` (position, block)."""
    if "block_position_ids" not in source_of(module):
        return []
    return [cls for cls in generation_classes(module) if own(cls, "prepare_inputs_for_generation") is not None]


def _positions_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _two_row_positions(module)]
    if not classes:
        return Decision(False, "no model with 2-D (position, block) position ids", present=False)
    if not _library_source_has("_prepare_position_ids_for_generation("):
        return Decision(False, f"transformers {ctx.versions['transformers']} leaves position ids to the model")
    return Decision(True, f"generate() now makes 1-row position ids, which {', '.join(classes)} index as "
                          "position_ids[:, 0, :]")


def _positions(ctx: Context, module: ModuleType) -> Replacements:
    prepare, update = "prepare_inputs_for_generation", "_update_model_kwargs_for_generation"
    replacements = []
    for cls in _two_row_positions(module):
        replacements.append((cls, prepare, _without_one_row_positions(own(cls, prepare))))
        if own(cls, update) is not None:
            replacements.append((cls, update, _update_without_one_row_positions(own(cls, update))))
    return replacements


def _without_one_row_positions(original: Any) -> Any:
    def prepare_inputs_for_generation(self, input_ids, *args, position_ids=None, **kwargs):
        """Position ids without the block row (generate()'s own) are dropped: the model builds its 2-D ones."""
        if position_ids is not None and position_ids.dim() == 2:
            position_ids = None
        return original(self, input_ids, *args, position_ids=position_ids, **kwargs)

    return prepare_inputs_for_generation


def _update_without_one_row_positions(original: Any) -> Any:
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """generate()'s own 1-row position ids are not extended as (position, block) rows; they are left out."""
        positions = model_kwargs.get("position_ids")
        if positions is not None and positions.dim() == 2:
            del model_kwargs["position_ids"]
        return original(self, outputs, model_kwargs, *args, **kwargs)

    return _update_model_kwargs_for_generation


GENERATION_2D_POSITIONS = Patch(
    name="generation-2d-position-ids",
    target="ChatGLMForConditionalGeneration.prepare_inputs_for_generation, _update_model_kwargs_for_generation",
    symptom="IndexError: too many indices for tensor of dimension 2 (at position_ids[:, 0, :], ChatGLM-6B generate)",
    needed=_positions_needed, replacements=_positions)


def _boolean_masks_only(module: ModuleType) -> list[type]:
    """Models whose generation keeps only a boolean ``[b, 1, s, s]`` mask (ChatGLM-6B) and drops any other."""
    return [cls for cls in generation_classes(module)
            if "torch.bool" in source_of(own(cls, "prepare_inputs_for_generation")) and hasattr(cls, "get_masks")]


def _boolean_mask_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _boolean_masks_only(module)]
    if not classes:
        return Decision(False, "no model that takes boolean attention masks only", present=False)
    refused = "; transformers 5.x refuses any other in generate()" if _library_source_has("must be 2D") else ""
    return Decision(True, f"{', '.join(classes)} drop 2-D padding masks, which glm-portable's batched generation "
                          f"passes{refused}: left padding would be attended")


def _boolean_mask(ctx: Context, module: ModuleType) -> Replacements:
    name = "prepare_inputs_for_generation"
    return [(cls, name, _with_boolean_mask(own(cls, name))) for cls in _boolean_masks_only(module)]


def _with_boolean_mask(original: Any) -> Any:
    def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, **kwargs):
        """A 2-D padding mask becomes the model's own boolean mask (its ``get_masks``) with padding masked out;
        tokens generated since (the model's cache update extends boolean masks only) count as real."""
        if attention_mask is not None and attention_mask.dim() == 2:
            missing = input_ids.shape[1] - attention_mask.shape[1]
            real = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], missing)), dim=1).bool()
            masked = self.get_masks(input_ids, device=input_ids.device)
            attention_mask = masked | ~real[:, None, None, :] | ~real[:, None, :, None]
        return original(self, input_ids, *args, attention_mask=attention_mask, **kwargs)

    return prepare_inputs_for_generation


GENERATION_BOOLEAN_MASK = Patch(
    name="generation-boolean-mask", target="ChatGLMForConditionalGeneration.prepare_inputs_for_generation",
    symptom="'`attention_mask` passed to `generate` must be 2D.'; with a 2-D mask, left padding is attended "
            "(batched ChatGLM-6B answers differ from one-by-one)",
    needed=_boolean_mask_needed, replacements=_boolean_mask)

GENERATION_PATCHES = (GENERATION_TUPLE_CACHE, GENERATION_EXTRACT_PAST, GENERATION_DROPPED_MASK,
                      GENERATION_LOGITS_WARPER, GENERATION_EOS_TENSOR, GENERATION_2D_POSITIONS,
                      GENERATION_BOOLEAN_MASK)
