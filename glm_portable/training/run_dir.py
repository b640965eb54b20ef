"""The run directory: run.json, checkpoint-<step>/ (complete ones marked), metrics.jsonl, results, loss.png."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from glm_portable.errors import NothingToDo, UserError
from glm_portable.data.manifest import file_sha256
from glm_portable.jsonfile import read_json_object, write_json_object

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
RESULTS = "train_results.json"
LOSS_PLOT = "loss.png"
COMPLETE = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# max_steps is not among them: resuming with a larger one extends the run.
IDENTITY_KEYS = ("model", "data", "method", "pre_seq_len", "prefix_projection", "lora_rank", "lora_alpha",
                 "lora_target", "lr", "batch_size", "grad_accum", "seed", "warmup_steps", "deepspeed", "quantization_bit",
                 "packing", "pack_length", "group_by_length")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (marked), oldest first."""
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE)


def mark_complete(checkpoint: Path) -> None:
    """COMPLETE, holding the sha256 of every file the checkpoint has, written by the run that saved it."""
    sums = {p.relative_to(checkpoint).as_posix(): file_sha256(p) for p in checkpoint_files(checkpoint)}
    write_json_object(checkpoint / COMPLETE, {"sha256": sums})


def rotate_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and unfinished ones older than those kept.

    Called only after the newest checkpoint is marked COMPLETE, so a kill at any moment leaves at
    least one complete checkpoint to resume from.
    """
    kept = complete_checkpoints(run_dir)[-keep:]
    if not kept:
        return []
    oldest = checkpoint_step(kept[0])
    removed = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child not in kept and int(match.group(1)) < oldest:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def verify_checkpoint(checkpoint: Path) -> None:
    """Refuse to resume from files this run did not write: resuming DeepSpeed unpickles its state
    (``global_step*/*.pt``, code that runs), so every file must match the checksum its COMPLETE recorded."""
    marker = checkpoint / COMPLETE
    recorded = None
    if marker.is_file() and marker.stat().st_size:
        recorded = read_json_object(marker).get("sha256")
    if not isinstance(recorded, dict):
        if any(checkpoint.glob("global_step*")):
            raise UserError(f"{checkpoint}: its COMPLETE marker records no checksums, and resuming its DeepSpeed state "
                            "would unpickle files nobody vouched for; start again (--overwrite) or train from its "
                            "weights (--model <checkpoint>)")
        return
    present = {p.relative_to(checkpoint).as_posix(): p for p in checkpoint_files(checkpoint)}
    for name in sorted(set(present) | set(recorded)):
        if name not in recorded:
            raise UserError(f"{checkpoint / name}: not written by this run (no checksum in {marker}); resume refused")
        if name not in present:
            raise UserError(f"{checkpoint / name}: missing (its checksum is in {marker}); resume refused")
        if file_sha256(present[name]) != recorded[name]:
            raise UserError(f"{checkpoint / name}: changed since this run wrote it (sha256 differs from {marker}); "
                            "resume refused")


def resolve_resume(run_dir: Path, identity: dict[str, Any], resume: Optional[str], overwrite: bool,
                   world_size: int = 1, verify: bool = True) -> Optional[Path]:
    """Decide, without changing anything, what a run does with its output dir; returns the checkpoint to resume.

    A dir holding a different run is refused unless --overwrite; the same run without --resume is
    refused too, so that nothing is silently discarded. ``verify`` checks the checkpoint's checksums
    (``verify_checkpoint``); a launcher's early look leaves that to the rank that resumes.
    """
    existing = run_dir / RUN_JSON
    if overwrite:
        return None
    if resume not in (None, "auto"):
        checkpoint_step(Path(resume))
        if verify:
            verify_checkpoint(Path(resume))
        return Path(resume)
    if not existing.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir}: exists and holds files that are not a glm-portable run (use --overwrite)")
        return None
    recorded = read_json_object(existing)
    previous = recorded.get("identity", {})
    differing = [k for k in IDENTITY_KEYS if previous.get(k) != identity.get(k)]
    if differing:
        raise UserError(f"{run_dir}: holds a different run (differs in {', '.join(differing)}); "
                        "use another --output or --overwrite")
    started = bool(complete_checkpoints(run_dir)) or (run_dir / RESULTS).is_file()
    if resume != "auto" and not started:
        return None  # it stopped before its first checkpoint (a failed start): nothing to keep, begin again
    if resume != "auto":
        raise UserError(f"{run_dir}: holds this run already; continue it with --resume auto or start again with --overwrite")
    if identity.get("deepspeed") and recorded.get("world_size") not in (None, world_size):
        raise UserError(f"{run_dir}: was trained on {recorded['world_size']} processes; DeepSpeed's sharded optimizer "
                        f"state cannot resume on {world_size}. Resume with the same --nproc/--nnodes, or start a new run "
                        "from the checkpoint's weights (--model <checkpoint>)")
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints and verify:
        verify_checkpoint(checkpoints[-1])
    return checkpoints[-1] if checkpoints else None


def checkpoint_step(checkpoint: Path) -> int:
    match = CHECKPOINT_RE.match(Path(checkpoint).name)
    if not match:
        raise UserError(f"--resume {checkpoint}: not a checkpoint directory (expected a name checkpoint-<step>)")
    return int(match.group(1))


def refuse_finished(run_dir: Path, checkpoint: Optional[Path], max_steps: int) -> None:
    """A run resumed from a checkpoint at or past --max-steps has nothing to train: say so rather than
    train a step more and overwrite its results."""
    if checkpoint is None or not (run_dir / RESULTS).is_file():
        return
    step = checkpoint_step(checkpoint)
    if step >= max_steps:
        raise NothingToDo(f"{run_dir}: the run finished at step {step} already (--max-steps {max_steps}); "
                          "nothing to train. A larger --max-steps with --resume auto extends it.")


def prepare_run_dir(run_dir: Path, identity: dict[str, Any], resume: Optional[str], overwrite: bool,
                    world_size: int = 1, max_steps: Optional[int] = None) -> Optional[Path]:
    """``resolve_resume`` (and ``refuse_finished`` given ``max_steps``), then clear the dir for --overwrite."""
    checkpoint = resolve_resume(run_dir, identity, resume, overwrite, world_size)
    if max_steps is not None:
        refuse_finished(run_dir, checkpoint, max_steps)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    return checkpoint


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metric lines the interrupted run logged after its last complete checkpoint."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(run_dir: Path) -> Optional[Path]:
    """loss.png from metrics.jsonl (Agg backend: no display needed)."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    target = run_dir / LOSS_PLOT
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
