"""Library-level fixes, applied at process start: what the Ascend recipe did by copying
``training_args.py`` and ``deepspeed.py`` over site-packages, and the transformers renames that
ChatGLM training scripts trip on (docs/transformers-breakages.md 16-17; docs/npu.md, library floors)."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from glm_portable.errors import UserError

from .registry import Context, Decision, MarkedProperty, Patch, Replacements

TRANSFORMERS_FLOOR = "4.40"  # pyproject's floor


def _deepspeed_module_needed(ctx: Context, target: Any) -> Decision:
    import transformers

    package = Path(transformers.__file__).parent
    if (package / "deepspeed.py").is_file() or (package / "deepspeed").is_dir():
        return Decision(False, f"transformers {ctx.versions['transformers']} still has transformers.deepspeed")
    return Decision(True, "transformers.deepspeed was removed in 4.46 (now transformers.integrations.deepspeed)")


def _deepspeed_module(ctx: Context, target: Any) -> Replacements:
    import transformers

    moved = importlib.import_module("transformers.integrations.deepspeed")
    return [(sys.modules, "transformers.deepspeed", moved), (transformers, "deepspeed", moved)]


TRANSFORMERS_DEEPSPEED_MODULE = Patch(
    name="transformers-deepspeed-module", target="sys.modules['transformers.deepspeed']",
    symptom="ModuleNotFoundError: No module named 'transformers.deepspeed'", kind="library",
    needed=_deepspeed_module_needed, replacements=_deepspeed_module)


def _trainer_tokenizer_needed(ctx: Context, target: Any) -> Decision:
    from transformers import Trainer

    if "tokenizer" in inspect.signature(TRAINER_TOKENIZER.original(Trainer, "__init__")).parameters:
        return Decision(False, f"transformers {ctx.versions['transformers']} Trainer takes tokenizer=")
    return Decision(True, "Trainer(tokenizer=...) and Trainer.tokenizer are gone in 5.0 (processing_class)")


def _trainer_tokenizer(ctx: Context, target: Any) -> Replacements:
    from transformers import Trainer

    original = TRAINER_TOKENIZER.original(Trainer, "__init__")

    def __init__(self, *args, tokenizer=None, **kwargs):
        if tokenizer is not None:
            kwargs.setdefault("processing_class", tokenizer)
        original(self, *args, **kwargs)

    def tokenizer(self):
        return self.processing_class

    return [(Trainer, "__init__", __init__), (Trainer, "tokenizer", MarkedProperty(tokenizer))]


TRAINER_TOKENIZER = Patch(
    name="trainer-tokenizer-argument", target="transformers.Trainer.__init__, Trainer.tokenizer",
    symptom="TypeError: Trainer.__init__() got an unexpected keyword argument 'tokenizer'", kind="library",
    needed=_trainer_tokenizer_needed, replacements=_trainer_tokenizer)


def _training_args_needed(ctx: Context, target: Any) -> Decision:
    if ctx.backend != "npu":
        return Decision(False, f"only NPUs needed the copied training_args.py, not {ctx.backend}")
    if ctx.below("transformers", "4.32"):
        return Decision(True, f"transformers {ctx.versions['transformers']} predates NPU device setup (4.32)")
    return Decision(False, f"transformers {ctx.versions['transformers']} sets up NPU devices, fp16 on NPU and hccl "
                           "itself (since 4.32 / 4.34)")


def _refuse_old(library: str, floor: str, reason: str):
    def replacements(ctx: Context, target: Any) -> Replacements:
        raise UserError(f"{library} {ctx.versions[library]} {reason}; glm-portable needs {library}>={floor} "
                        f"(pip install '{library}>={floor}') instead of patched copies of its files")

    return replacements


TRAINING_ARGS_NPU = Patch(
    name="training-args-npu", target="transformers.TrainingArguments device setup",
    symptom="TrainingArguments puts NPU runs on the CPU or rejects fp16 on NPU", kind="library",
    needed=_training_args_needed,
    replacements=_refuse_old("transformers", TRANSFORMERS_FLOOR, "has no NPU device setup"))


def _deepspeed_check_needed(ctx: Context, target: Any) -> Decision:
    if ctx.versions.get("deepspeed") is None:
        return Decision(False, "DeepSpeed is not installed")
    if ctx.backend == "npu" and ctx.below("deepspeed", "0.10.1"):
        return Decision(True, f"DeepSpeed {ctx.versions['deepspeed']} predates its NPU accelerator (0.10.1)")
    return Decision(False, f"DeepSpeed {ctx.versions['deepspeed']} and transformers' version check accept each other "
                           "(NPU accelerator since DeepSpeed 0.10.1, DS_ACCELERATOR set by the backend)")


DEEPSPEED_VERSION_CHECK = Patch(
    name="deepspeed-version-check", target="transformers' deepspeed version check",
    symptom="transformers refuses the deepspeed_npu-era DeepSpeed", kind="library", needed=_deepspeed_check_needed,
    replacements=_refuse_old("deepspeed", "0.12", "has no NPU accelerator"))


def _safetensors_needed(ctx: Context, target: Any) -> Decision:
    return Decision(False, "glm-portable reads .bin and .safetensors checkpoints alike (save_pretrained writes "
                           "safetensors since transformers 4.35)")


def _nothing(ctx: Context, target: Any) -> Replacements:
    return {}


SAFETENSORS_CHECKPOINTS = Patch(
    name="safetensors-checkpoints", target="checkpoint loading",
    symptom="a loader looking for pytorch_model.bin finds model.safetensors", kind="library",
    needed=_safetensors_needed, replacements=_nothing)

LIBRARY_PATCHES = (TRANSFORMERS_DEEPSPEED_MODULE, TRAINER_TOKENIZER, TRAINING_ARGS_NPU, DEEPSPEED_VERSION_CHECK,
                   SAFETENSORS_CHECKPOINTS)
