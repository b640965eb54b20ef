"""The comparison's figures: throughput bars, loss curves overlaid, per-step relative loss error."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import Alignment


def _pyplot():
    """matplotlib on the Agg backend: reports are written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_throughput(records: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(records) + 2), 4))
    values = [r["results"]["samples_per_s"] for r in records]
    bars = ax.bar([r["name"] for r in records], values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values])
    ax.set_ylabel("samples / s")
    ax.set_title("training throughput")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for record in records:
        points = [(step, loss) for step, loss in enumerate(record["results"]["losses"], start=1) if loss is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], label=record["name"], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_loss_error(alignments: list["Alignment"], threshold: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for alignment in alignments:
        ax.plot(alignment.steps, [100 * e for e in alignment.relative_errors], label=alignment.name, marker=".")
    ax.axhline(100 * threshold, color="tab:red", linestyle="--", label=f"{threshold:.0%} threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("relative loss error vs baseline (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
