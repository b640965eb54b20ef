"""Weights by upstream key name: read ``.bin`` / ``.safetensors`` (sharded or not), write safetensors.

Every directory is written under a temporary name and renamed at the end, so an interrupted save
never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from glm_portable.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight shards of a directory: from an index json if present, else single or globbed files."""
    model_dir = Path(model_dir)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: not a weight index (expected a 'weight_map' object): {exc}") from None
            files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index}: shards listed but not found: {', '.join(missing)}")
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (model_dir / single).is_file():
            return [model_dir / single]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(
            f"{model_dir}: no weights found (looked for {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE}, {BIN_SINGLE})"
        )
    return files


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise UserError(f"{path}: cannot read weights: {exc}") from None


def iter_state_dict(model_dir: str | Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """One shard at a time, so a 6B checkpoint never needs two copies in memory."""
    for path in weight_files(model_dir):
        yield path, read_shard(path)


Transform = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def load_weights(
    module: torch.nn.Module, model_dir: str | Path, optional_prefixes: tuple[str, ...] = (),
    transform: Optional[Transform] = None,
) -> list[str]:
    """Copy every tensor of the directory into ``module`` by key name (casting to the parameter dtype).

    Raises a UserError naming missing and unexpected keys; keys under ``optional_prefixes`` may be
    missing and are returned so the caller can initialise them. ``transform`` turns one checkpoint
    tensor into the tensors to store (quantizing a weight into weight and scale) as it is read.
    """
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    seen: set[str] = set()
    unexpected: list[str] = []
    shapes: list[str] = []
    with torch.no_grad():
        for path, shard in iter_state_dict(model_dir):
            stored = ((k, t) for key, tensor in shard.items()
                      for k, t in (transform(key, tensor) if transform else {key: tensor}).items())
            for key, tensor in stored:
                target = targets.get(key)
                if target is None:
                    unexpected.append(key)
                elif target.shape != tensor.shape:
                    shapes.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)} ({path.name})")
                elif target.is_floating_point() != tensor.is_floating_point():
                    shapes.append(f"{key}: checkpoint {tensor.dtype} vs model {target.dtype} ({path.name}; quantized "
                                  "weights need a model quantized to the same bits)")
                else:
                    target.copy_(tensor)
                    seen.add(key)
    missing = [k for k in targets if k not in seen]
    optional = [k for k in missing if k.startswith(optional_prefixes)] if optional_prefixes else []
    missing = [k for k in missing if k not in optional]
    problems = []
    if shapes:
        problems.append("shape or type mismatch: " + "; ".join(shapes[:5]))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]) + (" …" if len(unexpected) > 8 else "")
        )
    if problems:
        raise UserError(f"{model_dir}: weights do not match the model: " + " | ".join(problems))
    return optional


def _shard_groups(state: dict[str, torch.Tensor], max_bytes: int | None, num_shards: int | None) -> list[list[str]]:
    keys = list(state)
    sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
    if num_shards:
        limit = -(-sum(sizes.values()) // num_shards)
    else:
        limit = max_bytes or DEFAULT_MAX_SHARD_BYTES
    groups: list[list[str]] = [[]]
    used = 0
    for key in keys:
        if groups[-1] and used + sizes[key] > limit and (not num_shards or len(groups) < num_shards):
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += sizes[key]
    return groups


def write_weights(
    state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None, num_shards: int | None = None
) -> list[str]:
    """Write safetensors files (with an index when there is more than one); returns the file names."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    groups = _shard_groups(state, max_shard_bytes, num_shards)
    if len(groups) == 1:
        save_file(state, str(directory / SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    names, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(directory / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names + [SAFE_INDEX]


MODEL_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "*.py")


def copy_model_files(base_dir: Path, directory: Path) -> None:
    """The base directory's tokenizer and remote-code files that ``directory`` does not have yet, so that a
    saved model is a model directory of its own (what `chat --model`, `--impl remote` and upstream loaders expect)."""
    for pattern in MODEL_FILES:
        for source in Path(base_dir).glob(pattern):
            if source.is_file() and not (directory / source.name).exists():
                shutil.copy2(source, directory / source.name)
