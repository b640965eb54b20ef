"""ChatGLM2/3 rotary position embedding: GPT-J style (adjacent pairs) on the first half of each head."""

from __future__ import annotations

import torch
from torch import nn


def rotary_inv_freq(rotary_dims: int, base: float = 10000.0) -> torch.Tensor:
    """theta_i = base^(-2i/rotary_dims), i = 0 .. rotary_dims/2 - 1, in fp32."""
    return 1.0 / (base ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))


class RotaryEmbedding(nn.Module):
    """Angle tables for given positions.

    ``inv_freq`` is a persistent buffer only because upstream checkpoints carry it under
    ``transformer.rotary_pos_emb.inv_freq``; the angles are computed in fp32 from the base (times
    ``rope_ratio``), as ChatGLM3 does, and cast to the model dtype like upstream's cache. They are
    kept, per device and dtype, in a table that grows (doubling) to the longest sequence seen, so a
    forward looks its positions up instead of recomputing cos and sin.
    """

    def __init__(self, rotary_dims: int, rope_ratio: float = 1.0) -> None:
        super().__init__()
        self.rotary_dims = rotary_dims
        self.base = 10000.0 * rope_ratio
        self.register_buffer("inv_freq", rotary_inv_freq(rotary_dims), persistent=True)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_inv_freq(self) -> None:
        self.inv_freq = rotary_inv_freq(self.rotary_dims).to(self.inv_freq.device, self.inv_freq.dtype)

    def _table(self, device: torch.device, dtype: torch.dtype, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < length:
            size = max(length, 2 * cos.shape[0] if cos is not None else 256)
            theta = rotary_inv_freq(self.rotary_dims, self.base).to(device)
            angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * theta
            cos, sin = torch.cos(angles), torch.sin(angles)
            if dtype in (torch.float16, torch.bfloat16):
                cos, sin = cos.to(dtype), sin.to(dtype)
            self._tables[key] = cos, sin
        return cos, sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each ``[batch, seq, rotary_dims/2]``, for integer positions ``[batch, seq]`` below
        ``limit`` (the caller's bound, known without reading the positions from the device)."""
        cos, sin = self._table(positions.device, dtype, limit)
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the first ``2*cos.shape[-1]`` dims of ``x`` ``[batch, heads, seq, dim]``."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)
