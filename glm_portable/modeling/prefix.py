"""P-Tuning v2 prefix encoder: trainable per-layer key/value prefixes for a frozen model."""

from __future__ import annotations

import torch
from torch import nn

PREFIX_KEY = "transformer.prefix_encoder."


class PrefixEncoder(nn.Module):
    """Maps prefix positions 0..P-1 to every layer's (key, value) for every key/value group.

    Output width is ``num_layers * 2 * kv_groups * kv_channels`` (14336 for the ChatGLM2/3 6B models,
    2·28·4096 for ChatGLM-6B, whose groups are its heads), laid out layer-major, then key/value, then
    group, then channel, as upstream's checkpoints expect. The projection variant embeds at the full
    width for ChatGLM2/3 and at ``hidden_size`` for ChatGLM-6B (``narrow_projection``).
    """

    def __init__(self, pre_seq_len: int, num_layers: int, kv_groups: int, kv_channels: int, hidden_size: int,
                 prefix_projection: bool, narrow_projection: bool = False) -> None:
        super().__init__()
        width = num_layers * 2 * kv_groups * kv_channels
        self.prefix_projection = prefix_projection
        embedded = hidden_size if prefix_projection and narrow_projection else width
        self.embedding = nn.Embedding(pre_seq_len, embedded)
        if prefix_projection:
            self.trans = nn.Sequential(nn.Linear(embedded, hidden_size), nn.Tanh(), nn.Linear(hidden_size, width))

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


def prefix_key_values(encoder: PrefixEncoder, dropout: nn.Module, config, batch: int,
                      dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each ``[batch, kv_groups, P, kv_channels]``; no rotary is applied to them."""
    length = encoder.embedding.num_embeddings
    tokens = torch.arange(length, device=encoder.embedding.weight.device)
    out = encoder(tokens[None].expand(batch, -1)).to(dtype)
    out = out.view(batch, length, config.num_layers, 2, config.kv_groups, config.kv_channels)
    out = dropout(out).permute(2, 3, 0, 4, 1, 5)
    return [(layer[0], layer[1]) for layer in out]


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
