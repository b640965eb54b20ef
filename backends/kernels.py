"""Attention and RMSNorm kernels: the portable reference path every backend falls back to.

Tensors follow one convention so that vendor kernels can be swapped in: queries ``[batch, heads,
q_len, head_dim]``, keys and values ``[batch, kv_groups, kv_len, head_dim]`` (not yet expanded to
the query heads; query head ``h`` uses group ``h // (heads // kv_groups)``), and an optional boolean
mask ``[batch, 1, q_len, kv_len]`` where True means "may attend". ``causal`` without a mask is
aligned to the last key: query ``i`` of ``q_len`` sees keys up to ``i + kv_len - q_len``, so a
P-Tuning prefix or a cache in front of the queries needs no mask tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .quantized import QuantizedMatmulFn, reference_quantized_matmul, weight_only_quantized_matmul
from .varlen import PackedAttentionFn, PackedRows, from_varlen, to_varlen

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], bool, float], torch.Tensor]
RMSNormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Kernels:
    """The kernel choices a backend makes; the model calls these and nothing device-specific.
    ``quantized_matmul`` multiplies by a quantized frozen weight (``backends.quantized``); ``packed_attention``
    attends within packed rows (``backends.varlen``), None to give ``attention`` the rows' dense block mask;
    ``static_shapes``: the device compiles a graph per input shape, so the model avoids data-dependent shapes."""

    name: str
    attention: AttentionFn
    rms_norm: RMSNormFn
    quantized_matmul: QuantizedMatmulFn = weight_only_quantized_matmul
    packed_attention: Optional[PackedAttentionFn] = None
    static_shapes: bool = False

    def attend_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows, scale: float
                      ) -> torch.Tensor:
        """Attention within packed rows: the varlen kernel where there is one, else the block mask."""
        if self.packed_attention is not None:
            return self.packed_attention(q, k, v, rows, scale)
        return self.attention(q, k, v, rows.block_mask(), False, scale)


def expand_kv_groups(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat each key/value group for the query heads that share it (head h -> group h // per_group)."""
    groups = kv.shape[1]
    if groups == num_heads:
        return kv
    return kv.repeat_interleave(num_heads // groups, dim=1)


TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
SDPA_GROUPS = TORCH_VERSION >= (2, 5)  # enable_gqa: grouped keys and values without expanding them


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]``, True where query ``i`` may see key ``j``: ``j <= i + kv_len - q_len`` (causal aligned to
    the last key)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def causal_to_last_key(q_len: int, kv_len: int, device: torch.device) -> Any:
    """The causal mask aligned to the last key, as torch's ``causal_lower_right`` bias where torch has it (its
    fused kernels take it without a dense mask), else as a boolean tensor."""
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        return causal_mask(q_len, kv_len, device)
    return causal_lower_right(q_len, kv_len)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, scale: float
) -> torch.Tensor:
    """Portable path: torch's fused scaled-dot-product attention, available on every device; grouped keys and
    values go in as they are (``enable_gqa``), and causal attention behind a prefix or cache takes torch's
    lower-right causal bias, so neither keeps SDPA off its fused kernels."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    extra: dict[str, Any] = {}
    if SDPA_GROUPS and k.shape[1] != q.shape[1]:
        extra["enable_gqa"] = True
    else:
        k, v = expand_kv_groups(k, q.shape[1]), expand_kv_groups(v, q.shape[1])
    if mask is None and causal and q_len != kv_len:
        if q_len > 1:
            mask = causal_to_last_key(q_len, kv_len, q.device)
        causal = False  # one query behind everything sees every key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          **extra)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, scale: float
) -> torch.Tensor:
    """Reference path written out op by op (fp32 scores and softmax), for tests and debugging."""
    k = expand_kv_groups(k, q.shape[1])
    v = expand_kv_groups(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is None and causal:
        mask = causal_mask(*scores.shape[-2:], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows,
                               scale: float) -> torch.Tensor:
    """Portable varlen reference: each packed row through ``sdpa_attention`` on its own, causal to its last key;
    for tests, and the CPU's path for long packs, where a row at a time costs less than the dense block mask."""
    batch, _, seq, _ = q.shape
    q_flat, k_flat, v_flat = to_varlen(q, k, v, rows)
    q_ends, k_ends = rows.host_ends()
    outputs = []
    for q0, q1, k0, k1 in zip([0, *q_ends[:-1]], q_ends, [0, *k_ends[:-1]], k_ends):
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (q_flat[q0:q1], k_flat[k0:k1], v_flat[k0:k1]))
        outputs.append(sdpa_attention(qi, ki, vi, None, True, scale)[0].transpose(0, 1))
    return from_varlen(torch.cat(outputs), batch, seq)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as ChatGLM2/3 define it: statistics and scaling in fp32, result in the input dtype."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (weight.float() * (x32 * torch.rsqrt(variance + eps))).to(x.dtype)


PORTABLE_KERNELS = Kernels(name="portable (sdpa)", attention=sdpa_attention, rms_norm=reference_rms_norm)
REFERENCE_KERNELS = Kernels(name="reference (eager)", attention=eager_attention, rms_norm=reference_rms_norm,
                            quantized_matmul=reference_quantized_matmul)
