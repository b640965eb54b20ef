"""Packages whose names load on first use (PEP 562): the CLI reads their option schemas to build its flags,
and should not import torch or model code to do so."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<where[name]>`` when ``name`` is first asked for.

    No exported name may be a submodule's: importing that submodule would set the package attribute to
    the module, hiding the export.
    """
    clashes = sorted(set(where) & set(where.values()))
    if clashes:
        raise ValueError(f"{package}: exports named like its submodules: {', '.join(clashes)}")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{where[name]}", package), name)

    return __getattr__
