"""An independent ChatGLM2/3 forward pass written from the upstream formulas (docs/architecture.md).

Sequence-first layout, the rope cache stacked as (cos, sin) pairs, the upstream mask construction
(tril, padding columns, padded query rows seeing everything, True = masked) and explicit per-head
loops over key/value groups. Used only to check the native implementation.
"""

import math

import torch


def _rms(x, w, eps):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (w.float() * (x.float() * torch.rsqrt(var + eps))).to(x.dtype)


def _rope(x, cache):
    sq, b, heads, _ = x.shape
    rot = cache.shape[-2] * 2
    x, x_pass = x[..., :rot], x[..., rot:]
    xs = x.reshape(sq, -1, heads, rot // 2, 2)
    rc = cache.view(sq, -1, 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * rc[..., 0] - xs[..., 1] * rc[..., 1], xs[..., 1] * rc[..., 0] + xs[..., 0] * rc[..., 1]], -1
    ).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


def _masks(batch, seq, past, padding):
    full = torch.ones(batch, seq, seq).tril()
    if past:
        full = torch.cat((torch.ones(batch, seq, past), full), dim=-1)
    if padding is not None:
        full = full * padding.unsqueeze(1)
        if not past:
            full -= padding.unsqueeze(-1) - 1
    return (full < 0.5).unsqueeze(1)


def reference_logits(state, config, input_ids, attention_mask=None, position_ids=None, prefix=None):
    """Logits ``[batch, seq, vocab]``; ``prefix`` is upstream's past_key_values: per layer (k, v) ``[P, b, G, d]``."""
    batch, seq = input_ids.shape
    heads, d, groups = config.num_attention_heads, config.kv_channels, config.multi_query_group_num
    if position_ids is None:
        position_ids = torch.arange(seq)[None].repeat(batch, 1)
    dim = d // 2
    theta = 1.0 / ((10000 * config.rope_ratio) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    idx = torch.outer(torch.arange(seq + 64, dtype=torch.float), theta)
    cache = torch.stack([torch.cos(idx), torch.sin(idx)], dim=-1)[position_ids].transpose(0, 1)
    past = prefix[0][0].shape[0] if prefix is not None else 0
    padding = attention_mask
    if prefix is not None and padding is not None:
        padding = torch.cat((torch.ones(batch, past), padding.float()), dim=-1)
    need_mask = (padding is not None and not bool(padding.all())) or (past and seq != 1)
    mask = _masks(batch, seq, past, padding.float() if padding is not None else None) if need_mask else None
    h = state["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)
    for n in range(config.num_layers):
        p = f"transformer.encoder.layers.{n}."
        x = _rms(h, state[p + "input_layernorm.weight"], config.layernorm_epsilon)
        mixed = x @ state[p + "self_attention.query_key_value.weight"].T + state[p + "self_attention.query_key_value.bias"]
        q = mixed[..., : heads * d].reshape(seq, batch, heads, d)
        k = mixed[..., heads * d : (heads + groups) * d].reshape(seq, batch, groups, d)
        v = mixed[..., (heads + groups) * d :].reshape(seq, batch, groups, d)
        q, k = _rope(q, cache), _rope(k, cache)
        if prefix is not None:
            k = torch.cat((prefix[n][0], k), dim=0)
            v = torch.cat((prefix[n][1], v), dim=0)
        context = torch.empty(batch, heads, seq, d)
        for head in range(heads):
            g = head // (heads // groups)
            qh = q[:, :, head].permute(1, 0, 2)
            kh, vh = k[:, :, g].permute(1, 0, 2), v[:, :, g].permute(1, 0, 2)
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
            if mask is not None:
                scores = scores.masked_fill(mask[:, 0], float("-inf"))
            elif seq == k.shape[0]:
                scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
            context[:, head] = torch.softmax(scores.float(), -1) @ vh
        context = context.permute(2, 0, 1, 3).reshape(seq, batch, heads * d)
        h = h + context @ state[p + "self_attention.dense.weight"].T
        x = _rms(h, state[p + "post_attention_layernorm.weight"], config.layernorm_epsilon)
        up = x @ state[p + "mlp.dense_h_to_4h.weight"].T
        gate, value = up.chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * value) @ state[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms(h, state["transformer.encoder.final_layernorm.weight"], config.layernorm_epsilon)
    return (h @ state["transformer.output_layer.weight"].T).transpose(0, 1)


def reference_prefix(prefix_output, config):
    """Upstream get_prompt without dropout: ``[b, P, L*2*G*d]`` -> per layer (k, v) ``[P, b, G, d]``."""
    b, P, _ = prefix_output.shape
    pkv = prefix_output.view(b, P, config.num_layers * 2, config.multi_query_group_num, config.kv_channels)
    pairs = pkv.permute([2, 1, 0, 3, 4]).split(2)
    return [(pair[0], pair[1]) for pair in pairs]
