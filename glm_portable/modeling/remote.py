"""The `remote` implementation: a model directory's own modeling / tokenization code through
trust_remote_code, with the patches that make it run on the installed transformers and backend.

For users whose directories carry their own edits of THUDM's files, and as a cross-check of the
native implementation (same weights, same logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from glm_portable.backends import Backend
from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object
from glm_portable.patches import Context, remote_code_patched

from .loading import resolve_dtype
from .prefix import freeze_all_but_prefix, reset_prefix_encoder

IMPLEMENTATIONS = ("native", "remote")


def check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"--impl {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")


@dataclass
class RemoteModel:
    model: Any
    tokenizer: Any
    patches: list[str]


def remote_context(backend: Backend, dtype: torch.dtype) -> Context:
    return Context.current(backend.name, backend.kernels(dtype))


def check_remote_dir(path: Path) -> dict[str, Any]:
    """The directory's own classes by Auto class (config.json's ``auto_map`` plus its tokenizer's),
    refusing a directory without model or tokenizer code, or whose ``auto_map`` names missing files."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json (not a model directory)")
    auto_map = dict(read_json_object(config_file).get("auto_map") or {})
    if not any(key in auto_map for key in ("AutoModel", "AutoModelForCausalLM")):
        raise UserError(f"{config_file}: field auto_map has no AutoModel entry, so the directory carries no model "
                        "code of its own; use --impl native")
    for reference in auto_map.values():
        module = str(reference[0] if isinstance(reference, list) else reference).split(".")[0]
        if not (Path(path) / f"{module}.py").is_file():
            raise UserError(f"{config_file}: auto_map names {module}.py, which is not in {path}")
    tokenizer_file = Path(path) / "tokenizer_config.json"
    tokenizer_map = read_json_object(tokenizer_file).get("auto_map", {}) if tokenizer_file.is_file() else {}
    tokenizer = next((c for c in tokenizer_map.get("AutoTokenizer") or [] if c), None)
    if not tokenizer:
        raise UserError(f"{path}: no tokenizer code of its own (tokenizer_config.json with auto_map.AutoTokenizer); "
                        "use --impl native")
    return {**auto_map, "AutoTokenizer": tokenizer}


def load_remote(path: str | Path, backend: Backend, dtype: str | torch.dtype | None = None,
                pre_seq_len: Optional[int] = None, prefix_projection: bool = False, local_rank: int = 0,
                quantization_bit: Optional[int] = None) -> RemoteModel:
    """Tokenizer and model from the directory's own code, patched, on the backend's device.

    With ``pre_seq_len`` the remote PrefixEncoder is built (P-Tuning v2) and freshly initialised in
    fp32, as THUDM's recipe trains it, and everything else is frozen. ``quantization_bit`` calls the
    model's own ``quantize()`` (THUDM's CUDA-only kernels; refused elsewhere by a patch).
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = Path(path)
    auto_map = check_remote_dir(path)
    dtype = resolve_dtype(dtype, backend)
    with remote_code_patched(remote_context(backend, dtype)) as imported:
        tokenizer = _tokenizer(path)
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
        config.use_cache = True  # a checkpoint may carry training's false; the remote code needs it to generate
        if pre_seq_len is not None:
            config.pre_seq_len, config.prefix_projection = pre_seq_len, prefix_projection
        reference = auto_map["AutoModel" if "AutoModel" in auto_map else "AutoModelForCausalLM"]
        model_class = _with_generation(get_class_from_dynamic_module(reference, str(path)))
        model = model_class.from_pretrained(str(path), config=config, **_dtype_argument(dtype))
        if quantization_bit:
            model = _quantized(model, quantization_bit, path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    encoder = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
    if pre_seq_len is not None and encoder is not None:
        reset_prefix_encoder(model)
        encoder.float()
        freeze_all_but_prefix(model)
    model = model.to(backend.device(local_rank))
    return RemoteModel(model.eval(), tokenizer, imported.applied)


def _quantized(model: Any, bits: int, path: Path) -> Any:
    """The model after its own ``quantize(bits)``, called while the patches are in place (off CUDA one of them
    turns it into a clear refusal)."""
    quantize = getattr(model, "quantize", None)
    if not callable(quantize):
        raise UserError(f"{path}: the model's own code has no quantize(); --quantization-bit needs --impl native here")
    return quantize(bits) or model


def _with_generation(model_class: type) -> type:
    """The class as the Auto classes hand it out, with ``GenerationMixin`` added where transformers (4.45+) no
    longer gives it to every model. Resolved here rather than through ``AutoModel``: once a directory's config
    class is registered, a second AutoModel load in the same process returns the registered class without it."""
    try:
        from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model
    except ImportError:  # before 4.45 every PreTrainedModel is a GenerationMixin
        return model_class
    return add_generation_mixin_to_remote_model(model_class)


def load_remote_tokenizer(path: str | Path, backend: Backend) -> Any:
    """The directory's own tokenizer class, patched."""
    with remote_code_patched(Context.current(backend.name)):
        return _tokenizer(path)


def _tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def _dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    return {"dtype": dtype} if Context.current("cpu").at_least("transformers", "4.56") else {"torch_dtype": dtype}
