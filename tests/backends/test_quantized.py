"""THUDM's quantized weight format and the matmuls that read it: the reference, ATen's int8 kernel, the NPU's."""

import pytest
import torch

from glm_portable.backends import get_backend
from glm_portable.backends.kernels import PORTABLE_KERNELS, REFERENCE_KERNELS
from glm_portable.backends.quantized import dequantize, pack_int4, quantize_weight, unpack_int4


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    q = torch.tensor([[3, -2, -8, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x3E, -0x79]]  # 0x3E = 3 << 4 | 0xE;  0x87 = -8 << 4 | 7, as a signed byte
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits,top", [(8, 127), (4, 7)])
def test_scale_is_the_row_maximum_over_the_top_level_and_error_at_most_half_a_step(bits, top):
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    weight[3] = 0  # an all-zero row stays zero, with no division by zero
    q, scale = quantize_weight(weight, bits)
    assert q.dtype == torch.int8 and q.shape == (16, 32 * bits // 8)
    assert torch.allclose(scale, weight.abs().amax(-1) / top)
    values = unpack_int4(q) if bits == 4 else q
    assert values.abs().max() <= top
    restored = dequantize(q, scale, bits, torch.float32)
    assert torch.equal(restored[3], torch.zeros(32))
    assert ((restored - weight).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_backward_gives_the_input_gradient_of_the_dequantized_weight_and_keeps_no_float_weight(bits):
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(48, 64), bits)
    dense = dequantize(q, scale, bits, torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = REFERENCE_KERNELS.quantized_matmul(x, q, scale, bits)
    assert not any(t.is_floating_point() and t.numel() >= dense.numel() for t in saved)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ dense.t()).backward(grad)
    assert torch.allclose(out, x.detach() @ dense.t(), atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 1), (torch.bfloat16, 16), (torch.float32, 1),
                                        (torch.bfloat16, 64)])
def test_weight_only_int8_kernel_equals_the_reference(dtype, rows):
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(96, 128), 8)
    x = torch.randn(rows, 128).to(dtype)
    expected = REFERENCE_KERNELS.quantized_matmul(x.float(), q, scale, 8)
    got = PORTABLE_KERNELS.quantized_matmul(x, q, scale.to(dtype), 8)
    assert got.dtype == dtype and got.shape == (rows, 96)
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_npu_a2_uses_the_weight_quant_matmul_for_8_bits_and_matches_the_reference(fake_npu):
    kernels = get_backend("npu").kernels(torch.bfloat16)
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(40, 64), 8)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    out = kernels.quantized_matmul(x, q, scale.bfloat16(), 8)
    assert ("npu_weight_quant_batchmatmul", (64, 40)) in fake_npu.STATE.calls
    expected = REFERENCE_KERNELS.quantized_matmul(x.detach().float(), q, scale, 8)
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    out.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    fake_npu.STATE.calls.clear()
    q4, scale4 = quantize_weight(torch.randn(40, 64), 4)
    kernels.quantized_matmul(x.detach(), q4, scale4.bfloat16(), 4)
    assert not any(call[0] == "npu_weight_quant_batchmatmul" for call in fake_npu.STATE.calls)


def test_910a_keeps_the_reference_quantized_matmul(fake_npu):
    fake_npu.STATE.soc_name = "Ascend910A"
    kernels = get_backend("npu").kernels(torch.float16)
    q, scale = quantize_weight(torch.randn(8, 16), 8)
    kernels.quantized_matmul(torch.randn(2, 16, dtype=torch.float16), q, scale.half(), 8)
    assert not any(call[0] == "npu_weight_quant_batchmatmul" for call in fake_npu.STATE.calls)


@pytest.mark.gpu
@pytest.mark.skipif(not get_backend("cuda").is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,rows", [(8, 1), (8, 16), (8, 256), (4, 1), (4, 256)])
def test_cuda_quantized_matmul_equals_the_reference(bits, rows):
    backend = get_backend("cuda")
    kernels = backend.kernels(torch.bfloat16)
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(512, 1024), bits)
    q, scale = q.to(backend.device()), scale.to(backend.device())
    x = torch.randn(rows, 1024, device=backend.device(), dtype=torch.bfloat16, requires_grad=True)
    got = kernels.quantized_matmul(x, q, scale.bfloat16(), bits)
    expected = REFERENCE_KERNELS.quantized_matmul(x.detach().float(), q, scale, bits)
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    got.float().sum().backward()
    assert torch.allclose(x.grad.float(), dequantize(q, scale, bits, torch.float32).sum(0).expand(rows, -1),
                          rtol=2e-2, atol=2e-2)
