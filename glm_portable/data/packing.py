"""Padding-free training batches (``train --packing``): preprocessed rows packed into fixed-length sequences.

Each packed sequence holds whole rows; ``position_ids`` restart at 0 for every row and the model keeps
attention inside each row (``cu_seqlens``), so every row's loss is what it would be alone. Rows
are placed best-fit, longest first, which leaves little of a sequence empty on ADGEN's lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from glm_portable.modeling.model import IGNORE_INDEX


def pack_rows(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], length: int
              ) -> dict[str, list[list[int]]]:
    """Best-fit decreasing: each row, longest first, goes to the sequence whose free space fits it most tightly
    (a new one when none does). Returns the packed ``input_ids``, ``labels`` (each row's first one ignored, as
    the shifted loss ignores it alone) and ``position_ids``."""
    lengths = [len(row) for row in input_ids]
    too_long = [n for n in lengths if n > length]
    if too_long:
        raise ValueError(f"a row of {max(too_long)} tokens does not fit a packed sequence of {length}")
    free: list[list[int]] = [[] for _ in range(length + 1)]  # free space -> sequences with that much left
    packs: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[index]
        room = next((r for r in range(need, length + 1) if free[r]), None)
        if room is None:
            packs.append([])
            target, room = len(packs) - 1, length
        else:
            target = free[room].pop()
        packs[target].append(index)
        free[room - need].append(target)
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for rows in packs:
        packed["input_ids"].append([t for i in rows for t in input_ids[i]])
        # a row's first label is never predicted alone (the loss shifts by one); packed, the previous row's last
        # token would predict it
        packed["labels"].append([t for i in rows for t in [IGNORE_INDEX, *labels[i][1:]]])
        packed["position_ids"].append([p for i in rows for p in range(lengths[i])])
    return packed


def padding_fraction(lengths: Sequence[int], width: int) -> float:
    """The share of computed positions that carry no token when each of ``lengths`` fills a ``width``-wide row."""
    return 1 - sum(lengths) / (len(lengths) * width) if lengths else 0.0


@dataclass
class PackedCollator:
    """Packed sequences right-padded to ``length`` (one shape for every batch). ``cu_seqlens`` (int32) marks where
    each row starts and ends in the flattened ``batch * length`` tokens (a row starts where its position is 0);
    each sequence's padding tail is one more, unlabelled row. The boundaries are found here, on the host, so the
    model never derives them from device tensors (a sync); kernels that take host lengths read them back once."""

    pad_token_id: int
    length: int

    def __call__(self, packs: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = len(packs)
        ids = torch.full((batch, self.length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, self.length), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, self.length), dtype=torch.long)
        bounds = [0]
        for i, pack in enumerate(packs):
            n = len(pack["input_ids"])
            ids[i, :n] = torch.as_tensor(pack["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(pack["labels"], dtype=torch.long)
            positions[i, :n] = torch.as_tensor(pack["position_ids"], dtype=torch.long)
            start = i * self.length
            bounds += [start + j for j, p in enumerate(pack["position_ids"]) if p == 0 and j > 0]
            bounds += [start + n] if n < self.length else []
            bounds.append(start + self.length)
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}
