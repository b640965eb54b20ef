"""The native model against an independent upstream-formula reference, the KV cache and padding."""

import cmath

import pytest
import torch

from glm_portable.backends import PORTABLE_KERNELS, REFERENCE_KERNELS
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.rotary import RotaryEmbedding, apply_rotary

from .reference_chatglm import reference_logits, reference_prefix


def _batch(tokenizer, texts):
    return tokenizer.pad([tokenizer.encode(t) for t in texts])


TEXTS = ["类型#裙*颜色#红色", "Hello, how are you today? 你好", "问：水在多少度会结冰？"]


@pytest.fixture(scope="module")
def model(tiny2_dir):
    return load_model(tiny2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny2_dir):
    return load_tokenizer(tiny2_dir)


def _state(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kernels", ["portable", "reference"])
def test_logits_equal_upstream_formulas_with_left_padding(model, tokenizer, kernels):
    if kernels == "reference":
        model.set_kernels(REFERENCE_KERNELS)
    batch = _batch(tokenizer, TEXTS)
    try:
        with torch.no_grad():
            ours = model(**batch).logits
    finally:
        model.set_kernels(PORTABLE_KERNELS)
    ref = reference_logits(_state(model), model.config, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    real = batch["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4
    assert (ours - ref).abs().max().item() <= 1e-4, "padded rows follow upstream too"


def test_logits_equal_upstream_formulas_without_padding(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    with torch.no_grad():
        ours = model(ids).logits
    ref = reference_logits(_state(model), model.config, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_each_sample_alone(model, tokenizer):
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        together = model(**batch).logits
        for row, text in enumerate(TEXTS):
            alone = model(torch.tensor([tokenizer.encode(text)])).logits[0]
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(together[row][real], alone, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_with_cache_equals_full_forward(model, tokenizer):
    batch = _batch(tokenizer, TEXTS[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = torch.tensor([[11, 12, 13], [21, 22, 23]])
    full_ids = torch.cat((ids, extra), 1)
    full_mask = torch.cat((mask, torch.ones_like(extra)), 1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask).logits
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for i in range(extra.shape[1]):
            out = model(extra[:, i : i + 1], attention_mask=full_mask[:, : ids.shape[1] + i + 1],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, 1)
    real = full_mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-5)


def test_prefix_matches_upstream_and_cache(tiny2_dir, tokenizer):
    torch.manual_seed(0)
    model = load_model(tiny2_dir, dtype="float32", device="cpu", pre_seq_len=4, prefix_projection=True)
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        ours = model(**batch).logits
        encoder_out = model.transformer.prefix_encoder(torch.arange(4)[None].expand(3, -1))
    prefix = reference_prefix(encoder_out, model.config)
    ref = reference_logits(_state(model), model.config, batch["input_ids"], batch["attention_mask"],
                           batch["position_ids"], prefix=prefix)
    real = batch["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4
    with torch.no_grad():
        for row, text in enumerate(TEXTS):
            alone = model(torch.tensor([tokenizer.encode(text)])).logits[0]
            torch.testing.assert_close(ours[row][real[row]], alone, atol=1e-5, rtol=1e-5)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        first = model(ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
        step = model(ids[:, -2:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, ours[:, -2:], atol=1e-5, rtol=1e-5)


def test_rotary_tables_grow_past_their_first_size_and_equal_direct_angles():
    rotary = RotaryEmbedding(rotary_dims=8)
    positions = torch.tensor([[3, 255, 256, 700]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary(positions, dtype, limit=701)
        angles = positions.float()[..., None] * rotary.inv_freq
        torch.testing.assert_close(cos, torch.cos(angles).to(dtype))
        torch.testing.assert_close(sin, torch.sin(angles).to(dtype))
    assert {table[0].shape[0] for table in rotary._tables.values()} == {701}


def test_rotary_matches_complex_rotation_on_first_half_only():
    rotary = RotaryEmbedding(rotary_dims=8, rope_ratio=2.0)
    x = torch.randn(1, 1, 3, 16)
    positions = torch.tensor([[0, 5, 9]])
    cos, sin = rotary(positions, torch.float32, limit=10)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., 8:], x[..., 8:])
    for s, pos in enumerate(positions[0].tolist()):
        for i in range(4):
            theta = (10000.0 * 2.0) ** (-2 * i / 8)
            z = complex(x[0, 0, s, 2 * i], x[0, 0, s, 2 * i + 1]) * cmath.exp(1j * pos * theta)
            assert abs(out[0, 0, s, 2 * i].item() - z.real) < 1e-4
            assert abs(out[0, 0, s, 2 * i + 1].item() - z.imag) < 1e-4


def test_query_head_reads_its_key_value_group(model):
    """Zero all value rows but group 1: only heads 4..7 (of 8, 2 groups) produce output."""
    attn = model.transformer.encoder.layers[0].self_attention
    q = torch.randn(1, 8, 3, attn.head_dim)
    k = torch.randn(1, 2, 3, attn.head_dim)
    v = torch.zeros(1, 2, 3, attn.head_dim)
    v[:, 1] = 1.0
    out = attn.kernels.attention(q, k, v, None, True, 0.25)
    assert torch.all(out[:, :4] == 0) and torch.allclose(out[:, 4:], torch.ones_like(out[:, 4:]))


def test_loss_is_fp32_shifted_cross_entropy_ignoring_minus_100(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[0, :-1].float()
    targets = labels[0, 1:]
    keep = targets != -100
    manual = -torch.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, manual)


def test_bf16_logits_agree_with_fp32(tiny2_dir, tokenizer, model):
    """Tolerance: bf16 keeps 8 mantissa bits; on this 2-layer model logits differ by < 0.05 absolute."""
    bf16 = load_model(tiny2_dir, dtype="bfloat16", device="cpu")
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        a = model(**batch).logits
        b = bf16(**batch).logits.float()
    real = batch["attention_mask"].bool()
    assert (a[real] - b[real]).abs().max().item() < 0.05
    assert (a[real].argmax(-1) == b[real].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("select_labelled", [True, False])
@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_equals_the_plain_loss_and_gradients_and_keeps_no_logits(tiny2_dir, tokenizer, select_labelled,
                                                                              num_items):
    from glm_portable.modeling.model import causal_lm_loss, chunked_lm_loss

    model = load_model(tiny2_dir, dtype="float32", device="cpu", pre_seq_len=4)
    batch = _batch(tokenizer, TEXTS)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :4] = -100
    head = model.get_output_embeddings()
    results = []
    for chunked in (False, True):
        model.zero_grad()
        hidden, _ = model.transformer(batch["input_ids"], batch["attention_mask"])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if chunked:
                loss = chunked_lm_loss(hidden, head, labels, num_items, select_labelled, chunk_rows=5)
            else:
                loss = causal_lm_loss(head(hidden), labels, num_items)
        loss.backward()
        vocab_wide = [t for t in saved if t.dim() >= 2 and t.shape[-1] == head.out_features]
        results.append((loss.detach(), model.transformer.prefix_encoder.embedding.weight.grad.clone(), vocab_wide))
    (plain, plain_grad, plain_saved), (chunked, chunked_grad, chunked_saved) = results
    assert plain_saved and not chunked_saved  # the plain path keeps the whole batch's logits for backward
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-4, atol=1e-7)


def test_training_forward_returns_the_chunked_loss_and_no_logits(model, tokenizer):
    batch = _batch(tokenizer, TEXTS[:2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    try:
        trained = model(**batch, labels=labels)
    finally:
        model.eval()
    with torch.no_grad():
        evaluated = model(**batch, labels=labels)
    assert trained.logits is None and evaluated.logits is not None
    torch.testing.assert_close(trained.loss.detach(), evaluated.loss, rtol=1e-5, atol=1e-6)
