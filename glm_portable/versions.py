"""Installed versions of the libraries whose releases change what glm-portable must do (patches, records)."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = ("torch", "torch_npu", "transformers", "datasets", "deepspeed", "peft", "accelerate", "safetensors")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
