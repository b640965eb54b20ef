"""Packed-row attention: the varlen layout and every varlen kernel equal the dense block mask, values and gradients."""

import pytest
import torch

from glm_portable.backends import get_backend
from glm_portable.backends import cpu
from glm_portable.backends.kernels import eager_attention, reference_varlen_attention
from glm_portable.backends.varlen import from_varlen, packed_rows, to_varlen

CU_SEQLENS = [0, 3, 5, 8, 12, 16, 21, 24]  # three sequences of 8: rows 3+2+3, 4+4, 5+3


def _inputs(prefix_len, device="cpu", dtype=torch.float32, heads=4, groups=2, dim=16):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, heads, 8, dim), (3, groups, prefix_len + 8, dim), (3, groups, prefix_len + 8, dim)]
    return [torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def test_the_key_index_puts_each_rows_prefix_before_its_own_tokens():
    rows = packed_rows(torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32), batch=2, seq=8, prefix_len=2)
    # flattened keys: sequence 0 at 0..9 (prefix 0,1; tokens 2..9), sequence 1 at 10..19
    assert rows.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 10, 11, 14, 15, 16, 17,
                                       18, 19]
    assert rows.cu_k.tolist() == [0, 5, 12, 16, 24] and (rows.max_q, rows.max_k) == (8, 10)
    assert packed_rows(torch.tensor([0, 8], dtype=torch.int32), 1, 8, 0).key_index is None


def test_tnd_layout_round_trips():
    q, k, v = _inputs(0)
    rows = packed_rows(torch.tensor(CU_SEQLENS, dtype=torch.int32), 3, 8, 0)
    q_flat, k_flat, _ = to_varlen(q, k, v, rows)
    assert q_flat.shape == (24, 4, 16) and k_flat.shape == (24, 2, 16)
    torch.testing.assert_close(from_varlen(q_flat, 3, 8), q)


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_the_reference_equals_the_block_mask_with_gradients(prefix_len):
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    inputs = _inputs(prefix_len)
    rows = packed_rows(cu_seqlens, 3, 8, prefix_len)
    out = reference_varlen_attention(*inputs, rows, 0.25)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected = eager_attention(*inputs, rows.block_mask(), False, 0.25)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), inputs)):
        torch.testing.assert_close(got, want)


def test_the_block_mask_is_causal_inside_each_row_with_the_prefix_open():
    rows = packed_rows(torch.tensor([0, 2, 3, 6], dtype=torch.int32), batch=2, seq=3, prefix_len=1)
    assert rows.block_mask()[:, 0].int().tolist() == [
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]],
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
    ]


@pytest.mark.parametrize("seq,rows_at_a_time", [(8, False), (cpu.ROWS_AT_A_TIME_FROM, True)])
def test_the_cpu_takes_long_packs_a_row_at_a_time(monkeypatch, seq, rows_at_a_time):
    calls = []
    monkeypatch.setattr(cpu, "reference_varlen_attention", lambda *a: calls.append(1) or reference_varlen_attention(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 8, generator=g) for _ in range(3))
    rows = packed_rows(torch.tensor([0, seq // 2, seq], dtype=torch.int32), 1, seq, 0)
    out = get_backend("cpu").kernels(torch.float32).attend_packed(q, k, v, rows, 0.3)
    torch.testing.assert_close(out, eager_attention(q, k, v, rows.block_mask(), False, 0.3))
    assert bool(calls) == rows_at_a_time


@pytest.mark.gpu
@pytest.mark.skipif(not get_backend("cuda").is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefix_len", [0, 4])
def test_cuda_flash_varlen_equals_the_block_mask(prefix_len):
    backend = get_backend("cuda")
    kernels = backend.kernels(torch.bfloat16)
    assert kernels.packed_attention is not None, kernels.name
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=backend.device())
    inputs = _inputs(prefix_len, backend.device(), torch.bfloat16, heads=8, groups=2, dim=128)
    rows = packed_rows(cu_seqlens, 3, 8, prefix_len)
    out = kernels.packed_attention(*inputs, rows, 0.25)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    expected = eager_attention(*inputs, rows.block_mask(), False, 0.25)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    for got, want in zip(grads, torch.autograd.grad(expected.float().square().sum(), inputs)):
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=6e-2)
