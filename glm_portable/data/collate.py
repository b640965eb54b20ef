"""Padding at batch time: training rows right-padded (fixed length or longest in batch), evaluation left-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from glm_portable.modeling.model import IGNORE_INDEX

PADDING_MODES = ("fixed", "dynamic")


@dataclass
class TrainCollator:
    """Right-pads ``input_ids`` with the pad id and ``labels`` with -100, as THUDM's training data is padded.

    No attention mask is produced: right padding is invisible to causal attention, so the model takes
    its plain causal path. ``fixed`` pads every batch to ``fixed_length`` (static shapes for NPUs);
    ``dynamic`` pads to the longest row of the batch.
    """

    pad_token_id: int
    padding: str = "fixed"
    fixed_length: int | None = None

    def __post_init__(self) -> None:
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.padding == "fixed" and not self.fixed_length:
            raise ValueError("fixed padding needs fixed_length")

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = max(self.fixed_length or 0, longest) if self.padding == "fixed" else longest
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        return {"input_ids": ids, "labels": labels}
