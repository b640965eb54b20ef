"""Finding the classes of a remote-code module that a patch targets, by what they are, not by name,
so that renamed or edited copies of the upstream files are still recognised."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Optional

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def _defined_here(module: ModuleType, base: type) -> list[type]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == module.__name__]


def tokenizer_classes(module: ModuleType) -> list[type]:
    return _defined_here(module, PreTrainedTokenizerBase)


def config_classes(module: ModuleType) -> list[type]:
    return _defined_here(module, PretrainedConfig)


def model_classes(module: ModuleType) -> list[type]:
    return _defined_here(module, PreTrainedModel)


def generation_classes(module: ModuleType) -> list[type]:
    """The models that generate: those with a ``prepare_inputs_for_generation`` of their own."""
    return [cls for cls in model_classes(module) if "prepare_inputs_for_generation" in vars(cls)]


def own(cls: type, name: str) -> Optional[object]:
    """The attribute as the class itself defines it (not inherited), or None."""
    return vars(cls).get(name)


def source_of(obj: object) -> str:
    """The source of ``obj``, or of the code a patch wrapped in it (so detection does not depend on
    the order patches were applied in)."""
    try:
        return inspect.getsource(inspect.unwrap(obj) if callable(obj) else obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""
