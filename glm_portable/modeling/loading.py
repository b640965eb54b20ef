"""The public entry points: load a model directory, save a model or its prefix, load a prefix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from glm_portable.atomic import atomic_directory
from glm_portable.backends import Backend, select_backend
from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object

from .checkpoint import copy_model_files, iter_state_dict, load_weights, write_weights
from .architectures import new_model, optional_weight_prefixes
from .config import ChatGLMConfig, is_first_generation, load_config
from .model import ChatGLMForConditionalGeneration
from .prefix import PREFIX_KEY
from .quantization import quantize_block_linears, quantizing_transform
from .tokenizer import ChatGLMTokenizer
from .tokenizer_v1 import TOKENIZER_FILE as V1_TOKENIZER_FILE
from .tokenizer_v1 import ChatGLM1Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, backend: Backend) -> torch.dtype:
    """A dtype from its name, or the backend's policy when none is given."""
    if dtype is None:
        return backend.default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _backend(device: str | Backend | None) -> Backend:
    return device if isinstance(device, Backend) else select_backend(device).backend


def load_tokenizer(path: str | Path, family: Optional[str] = None) -> ChatGLMTokenizer | ChatGLM1Tokenizer:
    """The tokenizer of a model directory: ChatGLM-6B's ``ice_text.model`` when its config is first-generation,
    else ChatGLM2/3's ``tokenizer.model`` (family detected unless given)."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file() and is_first_generation(read_json_object(config)):
        if not (path / V1_TOKENIZER_FILE).is_file():
            raise UserError(f"{path}: no {V1_TOKENIZER_FILE} (a ChatGLM-6B directory needs its tokenizer file)")
        return ChatGLM1Tokenizer.from_pretrained(path)
    return ChatGLMTokenizer.from_pretrained(path, family)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | Backend | None = None,
    pre_seq_len: Optional[int] = None,
    prefix_projection: bool = False,
    local_rank: int = 0,
    quantization_bit: Optional[int] = None,
) -> ChatGLMForConditionalGeneration:
    """Build the native model from a ChatGLM2/3 directory and load its weights by key name.

    The model is created without allocating random weights (meta device), then filled shard by
    shard directly on the target device. With ``pre_seq_len`` the base is frozen and a fresh fp32
    prefix encoder is added (load a trained one with ``load_prefix``). With ``quantization_bit`` (or a
    pre-quantized directory's ``quantization_bit``) the blocks' linear layers are quantized as each
    weight is read. Attention, RMSNorm and the quantized matmul use the selected backend's kernels.
    Returned in eval mode.
    """
    backend = _backend(device)
    dtype = resolve_dtype(dtype, backend)
    config = load_config(path)
    bits = _quantization_bits(config, quantization_bit, path)
    model = _empty_model(config, backend, dtype, local_rank, pre_seq_len, prefix_projection, bits)
    uninitialised = load_weights(model, path, optional_prefixes=optional_weight_prefixes(model.config),
                                 transform=quantizing_transform(model) if bits else None)
    if any(not k.startswith(PREFIX_KEY) for k in uninitialised):
        model.reset_buffers()
    if model.config.pre_seq_len and any(k.startswith(PREFIX_KEY) for k in uninitialised):
        model.transformer.prefix_encoder.reset_parameters()
    return model.eval()


def random_model(
    config: ChatGLMConfig,
    dtype: str | torch.dtype | None = None,
    device: str | Backend | None = None,
    pre_seq_len: Optional[int] = None,
    prefix_projection: bool = False,
    local_rank: int = 0,
    quantization_bit: Optional[int] = None,
) -> ChatGLMForConditionalGeneration:
    """A model of ``config``'s shape with random weights (normal 0.02), made directly on the device.

    Benchmarks measure a 6B shape this way without downloading or writing 12 GB of weights; the
    compute is the same as with real weights. Seed first for reproducible weights. Quantized layers
    draw and quantize one weight at a time.
    """
    backend = _backend(device)
    dtype = resolve_dtype(dtype, backend)
    model = _empty_model(copy.deepcopy(config), backend, dtype, local_rank, pre_seq_len, prefix_projection,
                         quantization_bit)
    with torch.no_grad():
        model.apply(model._init_weights)
        model.reset_buffers()
        if model.config.pre_seq_len:
            model.transformer.prefix_encoder.reset_parameters()
    return model.eval()


def _quantization_bits(config: ChatGLMConfig, requested: Optional[int], path: Path | str) -> Optional[int]:
    """The bits to quantize to: as asked, or a pre-quantized directory's own (which cannot be changed)."""
    stored = config.quantization_bit or None
    if stored and requested and requested != stored:
        raise UserError(f"{Path(path) / 'config.json'}: the weights are quantized to {stored} bits; "
                        f"--quantization-bit {requested} cannot change that (use the 16-bit model)")
    return stored or requested


def _empty_model(config: ChatGLMConfig, backend: Backend, dtype: torch.dtype, local_rank: int,
                 pre_seq_len: Optional[int], prefix_projection: bool,
                 quantization_bit: Optional[int] = None) -> ChatGLMForConditionalGeneration:
    """Storage on the device without initialising it (meta build, then ``to_empty``); the prefix
    encoder in fp32, since it is what P-Tuning trains; quantized block layers when asked; the
    backend's kernels."""
    if pre_seq_len is not None:
        if pre_seq_len <= 0:
            raise UserError(f"pre_seq_len must be a positive integer, got {pre_seq_len}")
        config.pre_seq_len, config.prefix_projection = pre_seq_len, prefix_projection
    with torch.device("meta"):
        model = new_model(config)
        if quantization_bit:
            quantize_block_linears(model, quantization_bit)
    model.to_empty(device=backend.device(local_rank))
    model.to(dtype)
    if config.pre_seq_len:
        model.transformer.prefix_encoder.float()
    model.set_kernels(backend.kernels(dtype))
    return model


def save_model(
    model: ChatGLMForConditionalGeneration,
    out_dir: str | Path,
    tokenizer: Optional[ChatGLMTokenizer] = None,
    max_shard_bytes: Optional[int] = None,
    num_shards: Optional[int] = None,
    overwrite: bool = False,
    files_from: Optional[Path] = None,
) -> Path:
    """Save config.json, safetensors weights under upstream key names (sharded with an index) and the tokenizer;
    with ``files_from``, also that directory's tokenizer extras and code files (``copy_model_files``)."""
    with atomic_directory(out_dir, overwrite) as tmp:
        state = model.state_dict()
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        model.config.save(tmp, dtype=dtype)
        write_weights(state, tmp, max_shard_bytes=max_shard_bytes, num_shards=num_shards)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if files_from is not None:
            copy_model_files(files_from, tmp)
    return Path(out_dir)


def save_prefix(model: ChatGLMForConditionalGeneration, out_dir: str | Path, overwrite: bool = False) -> Path:
    """A P-Tuning checkpoint: only ``transformer.prefix_encoder.*`` plus the config that built it."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
    if not state:
        raise UserError("the model has no prefix encoder (load it with pre_seq_len to train one)")
    with atomic_directory(out_dir, overwrite) as tmp:
        model.config.save(tmp)
        write_weights(state, tmp)
    return Path(out_dir)


def load_prefix(model: ChatGLMForConditionalGeneration, checkpoint_dir: str | Path) -> None:
    """Load a prefix-only checkpoint (ours, or THUDM's ``pytorch_model.bin``) into the model's prefix encoder."""
    encoder = getattr(model.transformer, "prefix_encoder", None)
    if encoder is None:
        raise UserError(f"{checkpoint_dir}: a prefix checkpoint needs a model loaded with pre_seq_len")
    state = {}
    for _, shard in iter_state_dict(checkpoint_dir):
        state.update({k[len(PREFIX_KEY):]: v for k, v in shard.items() if k.startswith(PREFIX_KEY)})
    if not state:
        raise UserError(f"{checkpoint_dir}: no {PREFIX_KEY}* tensors found")
    expected = encoder.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state] + [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)} (pre_seq_len / prefix_projection differ?)"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise UserError(f"{checkpoint_dir}: prefix checkpoint does not fit the model: " + "; ".join(problems))
    encoder.load_state_dict(state)
