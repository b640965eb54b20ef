"""Patching a model directory's own code as transformers imports it (trust_remote_code).

transformers copies the directory's modules to its modules cache and imports them in
``get_class_in_module``; wrapping that function patches the imported module in memory, so nothing
is written into the model directory or the cache. Import-time patches (TorchScript off on NPU) are
active only while the module executes, which is re-run so that its decorators see them.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .generation_fixes import GENERATION_PATCHES
from .model_fixes import MODEL_PATCHES
from .npu_fixes import NPU_ATTENTION, NPU_NO_JIT, NPU_RMS_NORM
from .registry import APPLIED, Context, Decision, Patch
from .tokenizer_fixes import TOKENIZER_PATCHES

IMPORT_PATCHES: tuple[Patch, ...] = (NPU_NO_JIT,)
MODULE_PATCHES: tuple[Patch, ...] = (*TOKENIZER_PATCHES, *MODEL_PATCHES, *GENERATION_PATCHES, NPU_ATTENTION,
                                     NPU_RMS_NORM)


@dataclass
class RemoteReport:
    """Every patch decision taken for the modules imported under the hook: (patch, module file, decision)."""

    decisions: list[tuple[Patch, str, Decision]] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [f"{patch.name} ({module})" for patch, module, decision in self.decisions if decision.needed]


@contextmanager
def remote_code_patched(ctx: Context) -> Iterator[RemoteReport]:
    """While active, each remote module transformers imports is patched for ``ctx``."""
    import transformers.dynamic_module_utils as dynamic

    original = dynamic.get_class_in_module
    reloads = "force_reload" in inspect.signature(original).parameters
    report = RemoteReport()

    def get_class_in_module(class_name, module_path, *args, **kwargs):
        source = Path(dynamic.HF_MODULES_CACHE) / module_path
        file = Path(module_path).name
        at_import = [p for p in IMPORT_PATCHES if _decide(report, p, ctx, source, file).needed]
        if at_import and reloads:
            kwargs["force_reload"] = True
        for patch in at_import:
            patch.apply(ctx, source)
        try:
            cls = original(class_name, module_path, *args, **kwargs)
        finally:
            for patch in at_import:
                patch.revert()
        module = sys.modules[cls.__module__]
        for patch in MODULE_PATCHES:
            if _decide(report, patch, ctx, module, file).needed:
                patch.apply(ctx, module)
        return cls

    dynamic.get_class_in_module = get_class_in_module
    try:
        yield report
    finally:
        dynamic.get_class_in_module = original


def _decide(report: RemoteReport, patch: Patch, ctx: Context, target, file: str) -> Decision:
    """The patch's decision, recorded once per module file; a patch already on the module stays needed."""
    for known, where, decision in report.decisions:
        if known is patch and where == file:
            return decision
    decision = patch.needed(ctx, target)
    if not decision.needed and patch.kind != "import" and patch.is_applied(target):
        decision = Decision(True, "applied when this module was first imported")
    report.decisions.append((patch, file, decision))
    if decision.needed:
        APPLIED.add(patch.name, file)
    return decision
