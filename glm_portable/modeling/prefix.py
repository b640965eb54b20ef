"""P-Tuning v2 prefix encoder: trainable per-layer key/value prefixes for a frozen model."""

from __future__ import annotations

import torch
from torch import nn

PREFIX_KEY = "transformer.prefix_encoder."


class PrefixEncoder(nn.Module):
    """Maps prefix positions 0..P-1 to every layer's (key, value) for every key/value group.

    Output width is ``num_layers * 2 * kv_groups * kv_channels`` (14336 for the 6B models), laid out
    layer-major, then key/value, then group, then channel, as upstream's checkpoints expect.
    """

    def __init__(self, pre_seq_len: int, num_layers: int, kv_groups: int, kv_channels: int, hidden_size: int,
                 prefix_projection: bool) -> None:
        super().__init__()
        width = num_layers * 2 * kv_groups * kv_channels
        self.prefix_projection = prefix_projection
        self.embedding = nn.Embedding(pre_seq_len, width)
        if prefix_projection:
            self.trans = nn.Sequential(nn.Linear(width, hidden_size), nn.Tanh(), nn.Linear(hidden_size, width))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        if self.prefix_projection:
            out = self.trans(out)
        return out

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation (N(0,1) embedding), which THUDM's learning rates assume."""
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                module.reset_parameters()


def reset_prefix_encoder(model: nn.Module) -> None:
    """Re-initialise the prefix encoder of a native or a remote model (both are ``transformer.prefix_encoder``)."""
    encoder = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
    if encoder is None:
        raise ValueError("the model has no prefix encoder")
    for module in encoder.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            module.reset_parameters()


def freeze_all_but_prefix(model: nn.Module) -> None:
    """P-Tuning v2 trains the prefix encoder alone. Upstream code freezes the base in ``__init__``, but
    transformers 5.x materialises parameters after that, trainable again, so it is done here for every path."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(PREFIX_KEY))
