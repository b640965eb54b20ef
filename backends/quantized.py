"""THUDM's weight-only quantized linear layers: the stored format and the matmuls that read it.

The format (docs/quantization.md): ``weight`` int8 ``[out, in]`` at 8 bits, or ``[out, in / 2]`` at 4 bits
with two values a byte (the even input column in the high nibble, the odd one in the low nibble, both
signed); ``weight_scale`` ``[out]``, one symmetric scale per output row. A matmul dequantizes (or lets
a kernel do so) and multiplies; its backward returns the input gradient only, since the base is frozen,
and keeps nothing but the int8 weight for it.
"""

from __future__ import annotations

from typing import Callable

import torch

BITS = (4, 8)
QuantizedMatmulFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# ATen's weight-only int8 kernel beats dequantize-then-GEMM on few rows (decoding) and loses on many
# (training batches): docs/quantization.md has the CPU figures behind these limits.
WEIGHT_ONLY_MAX_ROWS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 1}


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantization to {bits} bits: expected one of {BITS}")


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: scale = max|row| / (2^(bits-1) - 1), q = round(w / scale) (packed at 4 bits); the scale
    in fp32 (callers store it in the model's dtype, as THUDM stores it in fp16)."""
    check_bits(bits)
    weight = weight.float()
    scale = weight.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
    q = torch.round(weight / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values a byte along the input dimension: column 2j high, 2j+1 low."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of input features, got {q.shape[-1]}")
    return (q[..., 0::2] << 4) | (q[..., 1::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 values back from ``pack_int4`` (arithmetic shifts keep the sign)."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` weight in ``dtype``: int values times their row's scale."""
    values = unpack_int4(weight) if bits == 4 else weight
    return values.to(dtype) * scale.to(dtype)[:, None]


def dequantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The forward of the reference path: dequantize to the input's dtype, then a plain matmul."""
    return torch.matmul(x, dequantize(weight, scale, bits, x.dtype).t())


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``forward(x)`` by any kernel; the backward dequantizes again instead of keeping a 16-bit weight."""

    @staticmethod
    def forward(ctx, x, weight, scale, bits, kernel):
        ctx.save_for_backward(weight, scale)
        ctx.bits = bits
        return kernel(x, weight, scale, bits)

    @staticmethod
    def backward(ctx, grad_output):
        weight, scale = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.matmul(grad_output, dequantize(weight, scale, ctx.bits, grad_output.dtype))
        return grad_input, None, None, None, None


def frozen_matmul(kernel: QuantizedMatmulFn) -> QuantizedMatmulFn:
    """A forward kernel made trainable through (input gradient only)."""
    def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        return _FrozenQuantizedMatmul.apply(x, weight, scale, bits, kernel)

    matmul.__doc__ = kernel.__doc__
    return matmul


reference_quantized_matmul = frozen_matmul(dequantized_matmul)


def _weight_only_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """ATen's ``_weight_int8pack_mm`` (CPU and CUDA) for 8 bits on few rows, else the reference forward."""
    rows = x.numel() // x.shape[-1]
    if bits != 8 or rows > WEIGHT_ONLY_MAX_ROWS.get(x.dtype, 0) or not hasattr(torch, "_weight_int8pack_mm"):
        return dequantized_matmul(x, weight, scale, bits)
    out = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).contiguous(), weight, scale.to(x.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[0])


weight_only_quantized_matmul = frozen_matmul(_weight_only_int8)


def npu_weight_quant_matmul(module) -> QuantizedMatmulFn:
    """torch_npu's ``npu_weight_quant_batchmatmul`` for 8 bits (per-channel scales, the weight passed transposed
    as ``[in, out]``, 2-D input); 4 bits take the reference forward (its int4 needs another packing)."""
    def forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        if bits != 8:
            return dequantized_matmul(x, weight, scale, bits)
        flat = x.reshape(-1, x.shape[-1])
        out = module.npu_weight_quant_batchmatmul(flat, weight.t(), scale.to(x.dtype))
        return out.reshape(*x.shape[:-1], weight.shape[0])

    return frozen_matmul(forward)
