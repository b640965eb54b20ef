"""``glm-portable export``: a tuned model as one model directory in upstream layout.

LoRA adapters are merged into the base weights; a P-Tuning prefix is written beside them with
``pre_seq_len`` / ``prefix_projection`` in config.json, which is how upstream code builds and loads
a prefix; a full checkpoint is re-saved in the chosen dtype. The directory also gets the base's
tokenizer and code files, so that ``load_model``, ``--impl remote``, ``serve`` and upstream's own
``from_pretrained`` all load it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm_portable.backends import get_backend
from glm_portable.evaluation import load_for_inference
from glm_portable.evaluation.pipeline import resolve_checkpoint
from glm_portable.jsonfile import read_json_object
from glm_portable.modeling import load_tokenizer, save_model
from glm_portable.modeling.loading import resolve_dtype
from glm_portable.training.methods import detect_method

from .options import ExportOptions


def export(options: ExportOptions) -> tuple[Path, str]:
    """Write ``options.out`` (atomically); returns it and the method that was exported.

    Weights are combined in fp32 on the CPU and cast once at the end, so merging adds no rounding
    of its own; the prefix encoder stays fp32, as upstream trains and loads it.
    """
    checkpoint = resolve_checkpoint(Path(options.checkpoint))
    method = detect_method(checkpoint)
    cpu = get_backend("cpu")
    dtype = resolve_dtype(options.dtype or _base_dtype(Path(options.model)), cpu)
    tokenizer = load_tokenizer(options.model)
    model = load_for_inference(Path(options.model), checkpoint, cpu, torch.float32)
    model = method.merged(model)
    model.to(dtype)
    encoder = getattr(model.transformer, "prefix_encoder", None)
    if encoder is not None:
        encoder.float()
    model.config.use_cache = True
    out = save_model(model, options.out, tokenizer, overwrite=options.overwrite, files_from=Path(options.model))
    return out, method.name


def _base_dtype(model_dir: Path) -> str:
    name = read_json_object(model_dir / "config.json").get("torch_dtype") or "float16"
    return name if name in ("float32", "bfloat16", "float16") else "float16"
