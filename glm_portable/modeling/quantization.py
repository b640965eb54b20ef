"""A quantized frozen base (``--quantization-bit 4|8``): THUDM's weight-only scheme on every backend.

Every linear layer inside the transformer blocks (fused q/k/v, attention output, both MLP projections)
becomes a ``QuantizedLinear`` holding THUDM's key names and format (``weight`` int8, ``weight_scale``);
embeddings, norms, the output layer, the prefix encoder and LoRA adapters keep their precision. The
model is built on the meta device with these layers in place, so loading quantizes one checkpoint
tensor at a time and the 16-bit base never exists whole (docs/quantization.md).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from glm_portable.backends.kernels import PORTABLE_KERNELS, Kernels
from glm_portable.backends.quantized import BITS, quantize_weight
from glm_portable.errors import UserError

SCALE_SUFFIX = "_scale"


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W stored quantized; nothing of it trains. ``weight`` is ``[out, in]`` int8 at 8 bits
    and ``[out, in / 2]`` at 4; ``weight_scale`` ``[out]`` is in the model's dtype; the matmul is the backend's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int) -> None:
        super().__init__()
        if bits not in BITS:
            raise UserError(f"--quantization-bit {bits}: expected one of {', '.join(map(str, BITS))}")
        if bits == 4 and in_features % 2:
            raise UserError(f"4-bit quantization packs two input features a byte; a layer has {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight", torch.empty(out_features, in_features * bits // 8, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernels: Kernels = PORTABLE_KERNELS

    def quantized(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight, scale) of a full-precision ``[out, in]`` weight, computed on this layer's device."""
        return quantize_weight(weight.to(self.weight.device), self.bits)

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``[out, in]`` weight into this layer."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} for a {self.in_features}→{self.out_features} layer")
        q, scale = self.quantized(weight)
        with torch.no_grad():
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernels.quantized_matmul(x, self.weight, self.weight_scale, self.bits)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _block_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every ``nn.Linear`` inside a transformer block (a ``layers.N`` module)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            parent_name, _, attribute = name.rpartition(".")
            yield model.get_submodule(parent_name), attribute, module


def quantize_block_linears(model: nn.Module, bits: int) -> int:
    """Swap the blocks' linear layers for empty ``QuantizedLinear`` ones (call on a meta model, before its storage
    is made); returns how many were swapped."""
    swapped = 0
    for parent, attribute, linear in _block_linears(model):
        layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits)
        setattr(parent, attribute, layer.to(linear.weight.device))
        swapped += 1
    if not swapped:
        raise UserError("--quantization-bit: the model has no linear layers inside transformer blocks")
    return swapped


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_bits(model: nn.Module) -> Optional[int]:
    """The bit width of the model's quantized layers, or None for an unquantized model."""
    return next((m.bits for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def quantizing_transform(model: nn.Module) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For ``checkpoint.load_weights``: a full-precision weight of a quantized layer becomes its int8 weight and
    scale, quantized on the layer's device; a pre-quantized one (int8, THUDM's int4/int8 directories) and every
    other tensor pass unchanged."""
    layers = {f"{name}.weight": layer for name, layer in quantized_layers(model).items()}

    def transform(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        layer = layers.get(key)
        if layer is None or not tensor.is_floating_point():
            return {key: tensor}
        if tuple(tensor.shape) != (layer.out_features, layer.in_features):
            return {key: tensor}  # load_weights reports the shape mismatch
        q, scale = layer.quantized(tensor)
        return {key: q, key + SCALE_SUFFIX: scale}

    return transform


def state_bytes(model: nn.Module) -> int:
    """Bytes of what the model's weights hold (its state dict; meta tensors count by their size)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
