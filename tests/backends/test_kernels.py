import torch

from glm_portable.backends.kernels import eager_attention, expand_kv_groups, reference_rms_norm, sdpa_attention


def _qkv(batch=2, heads=4, groups=2, q_len=5, kv_len=5, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, groups, kv_len, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, groups, kv_len, dim, generator=g, dtype=dtype)
    return q, k, v


def _naive(q, k, v, allowed, scale):
    """Loop over heads; head h reads group h // (heads // groups)."""
    heads, groups = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for h in range(heads):
        g = h // (heads // groups)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, -1) @ v[:, g]
    return out


def test_group_expansion_maps_head_to_group_by_integer_division():
    kv = torch.arange(2).view(1, 2, 1, 1).float()
    assert expand_kv_groups(kv, 6).flatten().tolist() == [0, 0, 0, 1, 1, 1]


def test_causal_sdpa_and_eager_equal_naive_grouped_attention():
    q, k, v = _qkv()
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = _naive(q, k, v, allowed, 0.3)
    torch.testing.assert_close(sdpa_attention(q, k, v, None, True, 0.3), expected)
    torch.testing.assert_close(eager_attention(q, k, v, None, True, 0.3), expected)


def test_explicit_mask_with_cache_offset():
    q, k, v = _qkv(q_len=2, kv_len=6)
    allowed = torch.ones(2, 2, 6, dtype=torch.bool)
    allowed[0, :, :2] = False
    allowed[:, 0, 5] = False
    mask = allowed[:, None]
    expected = torch.stack([_naive(q[i : i + 1], k[i : i + 1], v[i : i + 1], allowed[i], 0.5)[0] for i in range(2)])
    torch.testing.assert_close(sdpa_attention(q, k, v, mask, False, 0.5), expected)
    torch.testing.assert_close(eager_attention(q, k, v, mask, False, 0.5), expected)


def test_rms_norm_is_computed_in_fp32_and_returned_in_input_dtype():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.rand(16, dtype=torch.bfloat16)
    y = reference_rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    expected = (x32 / torch.sqrt((x32**2).mean(-1, keepdim=True) + 1e-5) * w.float()).bfloat16()
    torch.testing.assert_close(y, expected)
