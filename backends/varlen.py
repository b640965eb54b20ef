"""Attention over packed rows (``train --packing``) in the variable-length layout the fused kernels take.

A packed batch ``[batch, seq]`` holds several rows per sequence. Flattened to ``batch * seq`` tokens
(the "TND" layout: tokens, heads, head dim), row ``i`` spans ``cu_q[i]:cu_q[i + 1]``; its keys are the
P-Tuning prefix of its sequence, if any, then its own tokens, gathered into ``cu_k[i]:cu_k[i + 1]`` of
the flattened keys. Attention is causal inside each row, aligned to its last key, so every query sees
the whole prefix. A varlen kernel then costs what each row alone would, where a dense block mask pays
for every pair of positions in the sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class PackedRows:
    """Where each packed row lies in the flattened queries and keys. ``max_q``/``max_k`` are bounds (the
    sequence length, plus the prefix for keys): kernels size their work by them, and knowing them needs no
    read from the device. ``key_index`` gathers each row's keys (prefix, then its tokens) from the flattened
    ``[batch * (prefix + seq)]`` keys; None without a prefix, where the keys lie as the queries do."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    batch: int
    max_q: int
    max_k: int
    key_index: Optional[torch.Tensor]
    _host_ends: Optional[tuple[list[int], list[int]]] = field(default=None, repr=False)
    _block_mask: Optional[torch.Tensor] = field(default=None, repr=False)

    def host_ends(self) -> tuple[list[int], list[int]]:
        """Each row's end in the flattened queries and keys, on the host, for kernels that take lengths as
        host lists; read from the device once per forward, not once per layer."""
        if self._host_ends is None:
            self._host_ends = (self.cu_q[1:].tolist(), self.cu_k[1:].tolist())
        return self._host_ends

    def block_mask(self) -> torch.Tensor:
        """The same attention as a dense mask in the kernel convention, ``[batch, 1, seq, prefix + seq]``
        (True = may attend): causal inside each row, the prefix open to all; built once per forward."""
        if self._block_mask is None:
            seq, prefix_len = self.max_q, self.max_k - self.max_q
            flat = torch.arange(self.batch * seq, device=self.cu_q.device)
            row = torch.bucketize(flat, self.cu_q[1:].long(), right=True).view(self.batch, seq)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=row.device).tril()
            allowed = (row[:, :, None] == row[:, None, :]) & causal
            if prefix_len:
                allowed = torch.cat((allowed.new_ones(self.batch, seq, prefix_len), allowed), dim=-1)
            self._block_mask = allowed[:, None]
        return self._block_mask


def packed_rows(cu_seqlens: torch.Tensor, batch: int, seq: int, prefix_len: int) -> PackedRows:
    """``PackedRows`` for a packed batch whose row boundaries in the flattened ``batch * seq`` tokens are
    ``cu_seqlens`` (int32, ``[rows + 1]``, never crossing a sequence); computed on the device, no sync."""
    cu_q = cu_seqlens.to(torch.int32)
    if not prefix_len:
        return PackedRows(cu_q, cu_q, batch, seq, seq, None)
    rows = cu_q.shape[0] - 1
    cu_k = cu_q + prefix_len * torch.arange(rows + 1, dtype=torch.int32, device=cu_q.device)
    slots = torch.arange(batch * seq + rows * prefix_len, device=cu_q.device)
    row = torch.bucketize(slots, cu_k[1:].long(), right=True)
    offset = slots - cu_k.long()[row]
    start = cu_q.long()[row]
    sequence = torch.div(start, seq, rounding_mode="floor")
    base = sequence * (prefix_len + seq)
    token = base + prefix_len + (start - sequence * seq) + (offset - prefix_len)
    key_index = torch.where(offset < prefix_len, base + offset, token)
    return PackedRows(cu_q, cu_k, batch, seq, prefix_len + seq, key_index)


def to_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[batch, heads, seq, dim]`` and keys/values ``[batch, groups, prefix + seq, dim]`` (the kernel
    convention) as TND tensors: ``[batch * seq, heads, dim]`` and ``[rows' keys, groups, dim]``."""
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])

    k, v = flat(k), flat(v)
    if rows.key_index is not None:
        k, v = k.index_select(0, rows.key_index), v.index_select(0, rows.key_index)
    return flat(q), k, v


def from_varlen(out: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """A TND output back in the kernel convention ``[batch, heads, seq, dim]`` (a view)."""
    return out.view(batch, seq, out.shape[1], out.shape[2]).transpose(1, 2)


PackedAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedRows, float], torch.Tensor]


def _torch_varlen_attn() -> Optional[Callable]:
    """torch's flash-attention varlen entry point (``torch.nn.attention.varlen``, recent torch), if present."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "enable_gqa" in inspect.signature(varlen_attn).parameters else None


def flash_varlen_attention_fn() -> Optional[PackedAttentionFn]:
    """Packed-row attention through torch's flash varlen kernel (CUDA, half dtypes): causal with
    ``window_size=(-1, 0)``, which flash aligns to each row's last key; None where this torch lacks it."""
    varlen_attn = _torch_varlen_attn()
    if varlen_attn is None:
        return None

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows, scale: float
                  ) -> torch.Tensor:
        batch, heads, seq, _ = q.shape
        q_flat, k_flat, v_flat = to_varlen(q, k, v, rows)
        out = varlen_attn(q_flat, k_flat, v_flat, rows.cu_q, rows.cu_k, rows.max_q, rows.max_k, scale=scale,
                          window_size=(-1, 0), enable_gqa=k_flat.shape[1] != heads)
        return from_varlen(out, batch, seq)

    return attention
