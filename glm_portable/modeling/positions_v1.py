"""ChatGLM-6B's 2-D positions and prefix-LM mask, shared by its tokenizer (padding) and model (training rows).

Counted over a row's real tokens (left padding skipped): with c the index of ``<sop>`` and m that of
``[gMASK]`` (else ``[MASK]``), the position is 0..c−1 then m, the block position 0 for the first c
tokens then 1, 2, 3… A token sees every real context token (block position 0) and later ones causally.
See ``docs/chatglm-6b.md``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

_NONE = torch.iinfo(torch.long).max


def _first_rank(hits: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of the first hit, or ``_NONE``."""
    return torch.where(hits, rank, torch.full_like(rank, _NONE)).min(-1).values


def v1_position_ids(
    input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], bos_id: int, mask_ids: Sequence[int]
) -> torch.Tensor:
    """``[batch, 2, seq]`` (position, block position) of whole rows; 0 on padding.

    A row without ``<sop>`` is all context; without a mask token, m is the last context index.
    """
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rank = (real.long().cumsum(-1) - 1).clamp(min=0)
    count = real.long().sum(-1)
    context = _first_rank((input_ids == bos_id) & real, rank)
    context = torch.where(context == _NONE, count, context)
    mark = torch.full_like(context, _NONE)
    for token in reversed(tuple(mask_ids)):
        found = _first_rank((input_ids == token) & real, rank)
        mark = torch.where(found != _NONE, found, mark)
    mark = torch.where(mark == _NONE, (context - 1).clamp(min=0), mark)
    in_context = rank < context[:, None]
    position = torch.where(in_context, rank, mark[:, None])
    block = torch.where(in_context, torch.zeros_like(rank), rank - context[:, None] + 1)
    return torch.stack((position, block), dim=1) * real[:, None].long()


def advance_v1_positions(positions: torch.Tensor) -> torch.Tensor:
    """``[batch, 2, 1]`` positions of the next generated token: the position stays, the block position adds one."""
    step = torch.tensor([0, 1], dtype=positions.dtype, device=positions.device)
    return positions[..., -1:] + step[None, :, None]


def v1_attention_mask(
    block_positions: torch.Tensor, padding: Optional[torch.Tensor], past: int, prefix_len: int
) -> torch.Tensor:
    """``[batch, 1, seq, prefix + past + seq]``, True = may attend, for queries that are the last ``seq`` positions.

    ``padding`` covers past and current tokens (not the prefix). Keys of the current chunk with block
    position 0 are context and visible to every query; the P-Tuning prefix is always visible. A query
    that would see nothing (a padding row) sees every key, so no NaN can arise.
    """
    batch, seq = block_positions.shape
    device = block_positions.device
    keys = past + seq
    query_index = torch.arange(past, keys, device=device)[:, None]
    key_index = torch.arange(keys, device=device)[None, :]
    allowed = (key_index <= query_index)[None].expand(batch, -1, -1)
    context = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    context[:, past:] = block_positions == 0
    allowed = allowed | context[:, None, :]
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, :]
    if prefix_len:
        allowed = torch.cat((allowed.new_ones(batch, seq, prefix_len), allowed), dim=-1)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]
