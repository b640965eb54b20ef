"""`compare`: bench records side by side, in the Ascend recipe's table, with the loss-alignment verdict.

The verdict follows the Ascend / MindSpeed practice: the same seed, data and config on both devices,
per-step relative loss error against the first record, mean below 2 % passes; the maximum is
reported, and so is the gradient-norm error (MindSpeed's CI holds it within 10 %).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from glm_portable.atomic import atomic_directory
from glm_portable.errors import UserError
from glm_portable.jsonfile import write_json_object

from .plots import plot_loss_curves, plot_loss_error, plot_throughput
from .record import read_record, workload_differences

LOSS_THRESHOLD = 0.02
GRAD_NORM_THRESHOLD = 0.10
REPORT = "report.md"
SUMMARY = "compare.json"


@dataclass
class Alignment:
    """One record's losses against the baseline's, step by step."""

    name: str
    steps: list[int]
    relative_errors: list[float]
    grad_norm_mean_error: Optional[float]

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.relative_errors) if self.relative_errors else None

    @property
    def max(self) -> Optional[float]:
        return max(self.relative_errors) if self.relative_errors else None

    @property
    def passed(self) -> bool:
        return self.mean is not None and self.mean < LOSS_THRESHOLD


def _relative_errors(base: list[Any], other: list[Any]) -> tuple[list[int], list[float]]:
    steps, errors = [], []
    for step, (a, b) in enumerate(zip(base, other), start=1):
        if a is not None and b is not None and a != 0:
            steps.append(step)
            errors.append(abs(b - a) / abs(a))
    return steps, errors


def align(base: dict[str, Any], other: dict[str, Any]) -> Alignment:
    steps, errors = _relative_errors(base["results"]["losses"], other["results"]["losses"])
    _, grad_errors = _relative_errors(base["results"].get("grad_norms") or [], other["results"].get("grad_norms") or [])
    return Alignment(other["name"], steps, errors, statistics.fmean(grad_errors) if grad_errors else None)


def load_records(paths: list[Path], force: bool) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Records in the given order; workloads that differ from the first are refused unless ``force``."""
    records = [read_record(path) for path in paths]
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        raise UserError(f"records share a name ({', '.join(names)}); give each run its own `bench --name`")
    differences = {}
    for path, record in zip(paths[1:], records[1:]):
        fields = workload_differences(records[0], record)
        if fields:
            differences[record["name"]] = fields
            if not force:
                detail = "; ".join(f"{k}: {records[0]['workload'].get(k)!r} vs {record['workload'].get(k)!r}" for k in fields)
                raise UserError(f"{path}: its workload differs from {paths[0]}'s in {', '.join(fields)} ({detail}); "
                                "run both with the same bench options, or pass --force to compare anyway")
    return records, differences


def _gib(values: list[Any]) -> str:
    known = [v for v in values if v]
    return f"{max(known) / 2**30:.2f}" if known else "-"


def _torch_version(record: dict[str, Any]) -> str:
    versions = record["versions"]
    npu = versions.get("torch_npu")
    return f"{versions['torch']}" + (f" (torch_npu {npu})" if npu else "")


def table(records: list[dict[str, Any]]) -> str:
    """The Ascend recipe's columns first, then ours; the ratio is samples/s against the first record."""
    head = ("| NAME | SamplesPerSec | Iterations | DataType | Torch_Version | Card | TokensPerSec | MFU "
            "| PeakMemory_GiB | Ratio |\n|---|---|---|---|---|---|---|---|---|---|\n")
    base = records[0]["results"]["samples_per_s"]
    lines = []
    for r in records:
        res, device = r["results"], r["device"]
        mfu = f"{res['mfu'] * 100:.1f} %" if res.get("mfu") is not None else "-"
        lines.append(f"| {r['name']} | {res['samples_per_s']:.2f} | {r['workload']['steps']} | {r['dtype']} "
                     f"| {_torch_version(r)} | {device['count']} × {device['name']} | {res['tokens_per_s']:.0f} "
                     f"| {mfu} | {_gib(res['peak_memory_bytes'])} | {res['samples_per_s'] / base:.3f} |")
    return head + "\n".join(lines) + "\n"


def _alignment_section(records: list[dict[str, Any]], alignments: list[Alignment]) -> str:
    if not alignments:
        return "One record: nothing to align against.\n"
    lines = [f"Baseline: **{records[0]['name']}**. Per-step relative loss error |loss − baseline| / baseline; "
             f"passes when the mean is below {LOSS_THRESHOLD:.0%} (Ascend / MindSpeed practice).\n",
             "| NAME | Steps | Mean error | Max error | Grad-norm mean error | Verdict |",
             "|---|---|---|---|---|---|"]
    for a in alignments:
        grad = f"{a.grad_norm_mean_error:.2%}" if a.grad_norm_mean_error is not None else "-"
        verdict = "PASS" if a.passed else "FAIL"
        mean, worst = (f"{v:.3%}" if v is not None else "-" for v in (a.mean, a.max))
        lines.append(f"| {a.name} | {len(a.steps)} | {mean} | {worst} | {grad} | {verdict} |")
    return "\n".join(lines) + "\n"


def _workload_line(record: dict[str, Any]) -> str:
    w = record["workload"]
    return (f"shape {w['shape']}, method {w['method']}, batch {w['batch_size']} × accum {w['grad_accum']} × "
            f"{w['world_size']} processes, lengths {w['source_length']}/{w['target_length']}, "
            f"{w['warmup']} warm-up + {w['steps']} measured steps, seed {w['seed']}, lr {w['lr']}"
            + (f", base quantized to {w['quantization_bit']} bits" if w.get("quantization_bit") else ""))


def compare(paths: list[Path], out: Path, force: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write report.md, compare.json and the three plots to ``out``; returns the summary."""
    records, differences = load_records(paths, force)
    alignments = [align(records[0], r) for r in records[1:]]
    summary = {
        "baseline": records[0]["name"],
        "records": [{"name": r["name"], "file": str(p), "samples_per_s": r["results"]["samples_per_s"],
                     "ratio": r["results"]["samples_per_s"] / records[0]["results"]["samples_per_s"]}
                    for r, p in zip(records, paths)],
        "alignment": [{"name": a.name, "mean_relative_error": a.mean, "max_relative_error": a.max,
                       "grad_norm_mean_relative_error": a.grad_norm_mean_error, "passed": a.passed}
                      for a in alignments],
        "forced_differences": differences,
    }
    report = ["# glm-portable bench comparison\n", f"Workload: {_workload_line(records[0])}.\n"]
    if differences:
        report.append("**Compared with --force: the workloads differ** — "
                      + "; ".join(f"{name}: {', '.join(fields)}" for name, fields in differences.items()) + ".\n")
    report += ["## Throughput\n", table(records), "![throughput](throughput.png)\n", "## Loss alignment\n",
               _alignment_section(records, alignments), "![loss curves](loss.png)\n"]
    if alignments:
        report.append("![relative loss error](loss_error.png)\n")
    report.append("## Records\n\n" + "\n".join(f"- {r['name']}: `{p}`, code {r.get('code')}, created {r.get('created')}"
                                               for r, p in zip(records, paths)) + "\n")
    with atomic_directory(out, overwrite) as tmp:
        (tmp / REPORT).write_text("\n".join(report), encoding="utf-8")
        write_json_object(tmp / SUMMARY, summary)
        plot_throughput(records, tmp / "throughput.png")
        plot_loss_curves(records, tmp / "loss.png")
        if alignments:
            plot_loss_error(alignments, LOSS_THRESHOLD, tmp / "loss_error.png")
    return summary
