"""A torch_npu test double: the documented API the NPU backend uses, computed with plain torch on CPU.

Importing it registers the ``npu`` device type and ``torch.npu`` as the real package does. ``STATE``
controls what the double reports (device count, SoC name, bf16 support) and records what the backend
asked of it, so contract tests can check both results and calls.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field

import torch

__version__ = torch.__version__.split("+")[0] + ".post0"


@dataclass
class FakeState:
    device_count: int = 0
    soc_name: str = "Ascend910B3"
    compile_mode: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    seeds: list = field(default_factory=list)

    @property
    def is_a2(self) -> bool:
        return "910B" in self.soc_name or "910_93" in self.soc_name


STATE = FakeState(device_count=int(os.environ.get("FAKE_NPU_DEVICE_COUNT", "0")))


def _set_compile_mode(jit_compile: bool = True) -> None:
    STATE.compile_mode = {"jit_compile": jit_compile}


def _manual_seed_all(seed: int) -> None:
    STATE.seeds.append(seed)


npu = types.ModuleType("torch_npu.npu")
npu.is_available = lambda: STATE.device_count > 0
npu.device_count = lambda: STATE.device_count
npu.set_device = lambda index: STATE.calls.append(("set_device", index))
npu.current_device = lambda: 0
npu.synchronize = lambda device=None: STATE.calls.append(("synchronize", device))
npu.get_device_name = lambda index=0: STATE.soc_name
npu.is_bf16_supported = lambda: STATE.is_a2
npu.manual_seed = _manual_seed_all
npu.manual_seed_all = _manual_seed_all
npu.memory_allocated = lambda device=None: 0
npu.max_memory_allocated = lambda device=None: 0
npu.memory_reserved = lambda device=None: 0
npu.reset_peak_memory_stats = lambda device=None: None
npu.set_compile_mode = _set_compile_mode
npu._is_in_bad_fork = lambda: False

torch.utils.rename_privateuse1_backend("npu")
torch._register_device_module("npu", npu)


def _to_bnsd(x: torch.Tensor, layout: str, head_dim: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)
    if layout == "SBH":
        return x.view(x.shape[0], x.shape[1], -1, head_dim).permute(1, 2, 0, 3)
    raise RuntimeError(f"npu_fusion_attention: unsupported input_layout {layout!r}")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.transpose(1, 2).flatten(2)
    return x.permute(2, 0, 1, 3).flatten(2)


COMPRESSED_MASK_SIZE = 2048  # sparse modes 2-4 take this fixed upper-triangle mask, whatever the lengths


def _check_compressed_mask(atten_mask) -> None:
    expected = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool).triu(1)
    if atten_mask is None or atten_mask.dtype not in (torch.bool, torch.uint8) or tuple(atten_mask.shape) != (
            COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE) or not torch.equal(atten_mask.bool().cpu(), expected):
        raise RuntimeError("npu_fusion_attention: sparse_mode 3 needs the 2048x2048 upper-triangle atten_mask")


def _attend(q, k, v, head_num, scale, blocked):
    """softmax(scale * Q K^T, masked where ``blocked``) V over [N, S, D] or [B, N, S, D], GQA expanded."""
    heads_dim = q.dim() - 3
    if q.shape[heads_dim] != head_num or head_num % k.shape[heads_dim] != 0:
        raise RuntimeError(f"npu_fusion_attention: head_num {head_num} vs query {q.shape[heads_dim]} / "
                           f"key {k.shape[heads_dim]} heads")
    k = k.repeat_interleave(head_num // k.shape[heads_dim], dim=heads_dim)
    v = v.repeat_interleave(head_num // v.shape[heads_dim], dim=heads_dim)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _right_down_causal(q_len: int, kv_len: int) -> torch.Tensor:
    """Blocked positions of sparse_mode 3: query i sees keys up to i + kv_len - q_len."""
    return torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)


def _varlen(query, key, value, head_num, scale, actual_seq_qlen, actual_seq_kvlen):
    """TND: rows of the flattened tokens ending at the cumulative ``actual_seq_*len``, each attended alone."""
    if actual_seq_qlen is None or actual_seq_kvlen is None or len(actual_seq_qlen) != len(actual_seq_kvlen):
        raise RuntimeError("npu_fusion_attention: TND needs actual_seq_qlen and actual_seq_kvlen of one length")
    if not all(isinstance(n, int) for n in [*actual_seq_qlen, *actual_seq_kvlen]):
        raise RuntimeError("npu_fusion_attention: actual_seq_qlen/actual_seq_kvlen are host lists of int")
    if actual_seq_qlen[-1] != query.shape[0] or actual_seq_kvlen[-1] != key.shape[0]:
        raise RuntimeError("npu_fusion_attention: the last actual_seq_qlen/kvlen must be the total tokens")
    out = torch.empty(query.shape, dtype=torch.float32)
    for q0, q1, k0, k1 in zip([0, *actual_seq_qlen[:-1]], actual_seq_qlen, [0, *actual_seq_kvlen[:-1]],
                              actual_seq_kvlen):
        q, k, v = (x.float().transpose(0, 1) for x in (query[q0:q1], key[k0:k1], value[k0:k1]))
        out[q0:q1] = _attend(q, k, v, head_num, scale, _right_down_causal(q1 - q0, k1 - k0)).transpose(0, 1)
    return out


def npu_fusion_attention(
    query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
    keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0, prefix=None,
    actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
):
    """Documented semantics: softmax(scale * Q K^T, masked) V; A2 only; fp16/bf16; key/value heads may be a
    factor of head_num (GQA). sparse_mode 0: ``atten_mask`` True where blocked; 3: causal aligned to the last
    key, with the compressed 2048x2048 mask. TND (tokens, heads, dim) attends each row of the cumulative
    ``actual_seq_qlen``/``actual_seq_kvlen`` alone. Returns the documented 7-tuple."""
    STATE.calls.append(("npu_fusion_attention", input_layout, sparse_mode))
    if not STATE.is_a2:
        raise RuntimeError(f"npu_fusion_attention is only supported on Atlas A2, not {STATE.soc_name}")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"npu_fusion_attention: dtype {query.dtype} not supported (float16, bfloat16)")
    if keep_prob != 1.0 or pse is not None or sparse_mode not in (0, 3):
        raise NotImplementedError("the double models keep_prob=1, no pse, sparse_mode 0 and 3 only")
    if sparse_mode == 3:
        _check_compressed_mask(atten_mask)
    elif atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
        raise RuntimeError("npu_fusion_attention: atten_mask must be bool or uint8")
    empty = torch.empty(0)
    if input_layout == "TND":
        if sparse_mode != 3:
            raise NotImplementedError("the double models TND with sparse_mode 3 only")
        out = _varlen(query, key, value, head_num, scale, actual_seq_qlen, actual_seq_kvlen)
        return out.to(query.dtype), empty, empty, empty, 0, 0, 0
    head_dim = query.shape[-1] if input_layout in ("BNSD", "BSND") else query.shape[-1] // head_num
    q = _to_bnsd(query, input_layout, head_dim).float()
    k = _to_bnsd(key, input_layout, head_dim).float()
    v = _to_bnsd(value, input_layout, head_dim).float()
    if sparse_mode == 3:
        blocked = _right_down_causal(q.shape[2], k.shape[2])
    else:
        blocked = atten_mask.bool() if atten_mask is not None else None
    out = _attend(q, k, v, head_num, scale, blocked).to(query.dtype)
    return _from_bnsd(out, input_layout), empty, empty, empty, 0, 0, 0


def npu_rms_norm(x, gamma, epsilon=1e-6):
    """Documented: (x * rstd * gamma, rstd) with rstd = 1/sqrt(mean(x^2) + eps) in fp32; 910A and A2."""
    STATE.calls.append(("npu_rms_norm",))
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
    """Documented: x (M, K) fp16/bf16 times the int8 weight (K, N; a transposed view allowed) dequantized as
    (weight + offset) * scale, the scale (N,) or (1, N) in x's dtype; per-channel here; A2 only; output in x's dtype."""
    STATE.calls.append(("npu_weight_quant_batchmatmul", tuple(weight.shape)))
    if not STATE.is_a2:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: per-channel int8 here needs Atlas A2, not {STATE.soc_name}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
                           "are not (M, K) and (K, N)")
    if weight.dtype != torch.int8 or x.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"npu_weight_quant_batchmatmul: x {x.dtype}, weight {weight.dtype} not supported")
    if antiquant_scale.dtype != x.dtype or antiquant_scale.numel() != weight.shape[1]:
        raise RuntimeError("npu_weight_quant_batchmatmul: antiquant_scale must be (N,) in x's dtype")
    if antiquant_group_size or quant_scale is not None:
        raise NotImplementedError("the double models per-channel antiquantisation only")
    dense = weight.float()
    if antiquant_offset is not None:
        dense = dense + antiquant_offset.float().reshape(1, -1)
    out = torch.matmul(x.float(), dense * antiquant_scale.float().reshape(1, -1))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
