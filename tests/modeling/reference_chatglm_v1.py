"""An independent ChatGLM-6B forward pass written from the facts in docs/chatglm-6b.md, for equality tests.

It follows upstream's layout rather than ours: hidden states ``[seq, batch, hidden]``, a boolean
``[batch, 1, seq, seq]`` mask with True = masked filled with -10000, fp32 softmax, the attention
scale split as 1/(sqrt(d)·(layer+1)) on the query and ×(layer+1) on the scores, explicit tanh-GELU,
positions found per row with Python lists. It reads weights from a state dict by upstream key name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positions_and_mask(ids: list[list[int]], bos: int, gmask: int, pad: int):
    """Left-padded rows → position ids [b, 2, s] and the masked-is-True mask [b, 1, s, s], per docs/chatglm-6b.md."""
    batch, seq = len(ids), len(ids[0])
    positions = torch.zeros(batch, 2, seq, dtype=torch.long)
    masked = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
    for b, row in enumerate(ids):
        start = next(i for i, t in enumerate(row) if t != pad)
        real = row[start:]
        context = real.index(bos)
        mark = real.index(gmask)
        for i in range(len(real)):
            positions[b, 0, start + i] = i if i < context else mark
            positions[b, 1, start + i] = 0 if i < context else i - context + 1
            for j in range(len(real)):
                if j < context or j <= i:
                    masked[b, 0, start + i, start + j] = False
    return positions, masked


def _rotate(x, angles):
    """NeoX rotate-half on x [s, b, h, d] with angles [s, b, d/2]."""
    emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * emb.cos() + torch.cat((-second, first), dim=-1) * emb.sin()


def reference_logits(state: dict, config, ids: torch.Tensor, positions: torch.Tensor, masked: torch.Tensor,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [b, s, vocab]. ``prefix``: past keys/values [layers, 2, P, b, heads, d] (always visible)."""
    layers, heads, hidden = config.num_layers, config.num_attention_heads, config.hidden_size
    d = hidden // heads
    alpha = math.sqrt(2 * layers)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d // 2, 2).float() / (d // 2)))).half().float()
    x = state["transformer.word_embeddings.weight"][ids].transpose(0, 1).float()
    seq, batch = x.shape[:2]
    pos = positions[:, 0].T.float()[..., None] * inv_freq
    block = positions[:, 1].T.float()[..., None] * inv_freq
    for n in range(layers):
        p = f"transformer.layers.{n}."
        normed = F.layer_norm(x, (hidden,), state[p + "input_layernorm.weight"], state[p + "input_layernorm.bias"], 1e-5)
        mixed = normed @ state[p + "attention.query_key_value.weight"].T + state[p + "attention.query_key_value.bias"]
        q, k, v = mixed.view(seq, batch, heads, 3 * d).split(d, dim=-1)
        q = torch.cat((_rotate(q[..., : d // 2], pos), _rotate(q[..., d // 2:], block)), dim=-1)
        k = torch.cat((_rotate(k[..., : d // 2], pos), _rotate(k[..., d // 2:], block)), dim=-1)
        mask = masked
        if prefix is not None:
            k = torch.cat((prefix[n, 0], k), dim=0)
            v = torch.cat((prefix[n, 1], v), dim=0)
            mask = torch.cat((torch.zeros(batch, 1, seq, prefix.shape[2], dtype=torch.bool), masked), dim=-1)
        coeff = n + 1
        scores = torch.einsum("sbhd,tbhd->bhst", q / (math.sqrt(d) * coeff), k)
        scores = (scores.float() * coeff).masked_fill(mask, -10000.0)
        probs = torch.softmax(scores, dim=-1)
        context = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(seq, batch, hidden)
        attn = context @ state[p + "attention.dense.weight"].T + state[p + "attention.dense.bias"]
        x = normed * alpha + attn
        normed = F.layer_norm(x, (hidden,), state[p + "post_attention_layernorm.weight"],
                              state[p + "post_attention_layernorm.bias"], 1e-5)
        h = normed @ state[p + "mlp.dense_h_to_4h.weight"].T + state[p + "mlp.dense_h_to_4h.bias"]
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * h * (1.0 + 0.044715 * h * h)))
        x = normed * alpha + (h @ state[p + "mlp.dense_4h_to_h.weight"].T + state[p + "mlp.dense_4h_to_h.bias"])
    x = F.layer_norm(x, (hidden,), state["transformer.final_layernorm.weight"], state["transformer.final_layernorm.bias"],
                     1e-5)
    return (x @ state["lm_head.weight"].T).transpose(0, 1)
