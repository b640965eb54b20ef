"""Runtime patches and their registry: the fixes upstream recipes made by copying files, in memory.

Library patches are applied at process start (``apply_library_patches``); remote-code patches when
a model directory's own modules are imported (``remote_code_patched``). ``patch_table`` says, for
the installed stack, which are needed, which are applied, and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .library_fixes import LIBRARY_PATCHES
from .registry import APPLIED, Context, Decision, Patch
from .remote_hook import IMPORT_PATCHES, MODULE_PATCHES, RemoteReport, remote_code_patched

ALL_PATCHES: tuple[Patch, ...] = (*LIBRARY_PATCHES, *IMPORT_PATCHES, *MODULE_PATCHES)

__all__ = ["ALL_PATCHES", "APPLIED", "Context", "Decision", "Patch", "RemoteReport", "apply_library_patches",
           "patch_table", "remote_code_patched"]


def apply_library_patches(ctx: Context) -> list[str]:
    """Apply every library patch the installed stack needs; returns their names."""
    names = []
    for patch in LIBRARY_PATCHES:
        if patch.needed(ctx, None).needed:
            patch.apply(ctx)
            APPLIED.add(patch.name, "library")
            names.append(patch.name)
    return names


def patch_table(ctx: Context, report: Optional[RemoteReport] = None,
                model: Optional[Path] = None) -> list[dict[str, Any]]:
    """One row a patch: kind, target, needed, applied, why (remote ones per module of ``report``)."""
    rows = []
    for patch in LIBRARY_PATCHES:
        decision = patch.needed(ctx, None)
        rows.append({"name": patch.name, "kind": patch.kind, "target": patch.target, "needed": decision.needed,
                     "applied": patch.is_applied(), "why": decision.why, "symptom": patch.symptom})
    for patch in (*IMPORT_PATCHES, *MODULE_PATCHES):
        decisions = [(where, d) for known, where, d in (report.decisions if report else []) if known is patch]
        row = {"name": patch.name, "kind": patch.kind, "target": patch.target, "symptom": patch.symptom}
        concerned = [(where, d) for where, d in decisions if d.present]
        if not decisions:
            why = (f"not decided: {model}'s code runs only with --impl remote" if model is not None
                   else "decided per model directory (--model DIR --impl remote)")
            row.update(needed=None, applied=False, why=why)
        elif not concerned:
            row.update(needed=False, applied=False, why=f"{model}: its code has nothing this patch targets")
        else:
            needed = any(d.needed for _, d in concerned)
            row.update(needed=needed, applied=needed,
                       why="; ".join(f"{where}: {d.why}" for where, d in concerned if d.needed or not needed))
        rows.append(row)
    return rows
