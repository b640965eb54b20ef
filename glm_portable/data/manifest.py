"""``manifest.json`` of a preprocessed directory: what it was made from, and whether it fits a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: eval splits carry THUDM's cut references and the full ones


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(inputs: dict[str, Any]) -> str:
    """One hash of everything that determines the output: sources, tokenizer, template, options."""
    return hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION, **inputs}, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir}: no {MANIFEST} (not a directory written by `glm-portable preprocess`)")
    manifest = read_json_object(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {manifest.get('format_version')!r}, this glm-portable reads {FORMAT_VERSION}; "
            "run preprocess again"
        )
    return manifest


def check_compatible(data_dir: str | Path, tokenizer, template_name: str, model_dir: str | Path | None = None) -> dict:
    """Refuse shards made with another tokenizer or template than the model's; returns the manifest."""
    manifest = read_manifest(data_dir)
    made = manifest["tokenizer"]
    problems = []
    if made["fingerprint"] != tokenizer.fingerprint():
        problems.append(f"tokenizer {made['fingerprint'][:12]} vs the model's {tokenizer.fingerprint()[:12]}")
    if manifest["template"] != template_name:
        problems.append(f"template {manifest['template']} vs the model's {template_name}")
    if problems:
        where = f" at {model_dir}" if model_dir else ""
        raise UserError(
            f"{data_dir}: preprocessed for another model ({'; '.join(problems)}); "
            f"run `glm-portable preprocess --model <the model{where}>` again"
        )
    return manifest
