import pytest
import torch

from glm_portable.modeling import GenerationSettings, chat, load_model, load_tokenizer, stream_chat

TEXTS = ["类型#裙*颜色#红色", "Hello, how are you today? 你好", "问：水在多少度会结冰？"]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def _train_batch(tokenizer):
    batch = tokenizer.pad([tokenizer.encode(t) for t in TEXTS])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def test_with_prefix_only_the_prefix_encoder_trains(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**_train_batch(tokenizer)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"transformer.prefix_encoder.embedding.weight"}
    assert losses[-1] < losses[0]


def test_half_base_with_fp32_prefix_trains(tiny_dir, tokenizer):
    model = load_model(tiny_dir, dtype="bfloat16", device="cpu", pre_seq_len=4, prefix_projection=True)
    model.train()
    loss = model(**_train_batch(tokenizer)).loss
    loss.backward()
    grad = model.transformer.prefix_encoder.trans[0].weight.grad
    assert loss.dtype == torch.float32 and grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_prefix_gradients(tiny_dir, tokenizer):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=4)
        model.transformer.prefix_dropout.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(**_train_batch(tokenizer)).loss.backward()
        grads.append(model.transformer.prefix_encoder.embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_batched_greedy_generation_equals_one_by_one(tiny_dir, tokenizer, pre_seq_len):
    torch.manual_seed(0)
    model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=pre_seq_len)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    batch = tokenizer.pad(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.stop_ids, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            alone = model.generate(torch.tensor([prompt]), **kwargs)[0, len(prompt):]
            n = len(alone)
            assert together[row, :n].tolist() == alone.tolist()


def test_generation_uses_the_kv_cache_consistently(tiny_dir, tokenizer):
    """Cached greedy decoding equals recomputing the whole sequence at every step."""
    model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=4)
    prompt = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=[], pad_token_id=0)
        seq = prompt
        for _ in range(5):
            seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert cached.tolist() == seq.tolist()


def test_chat_and_stream_chat_agree_and_keep_history(tiny_dir, tokenizer):
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    settings = GenerationSettings(max_new_tokens=8, do_sample=False)
    answer, history = chat(model, tokenizer, "你好", settings=settings)
    streamed = list(stream_chat(model, tokenizer, "你好", settings=settings))
    assert streamed and streamed[-1][0] == answer
    assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": answer}]
    second, history = chat(model, tokenizer, "再见", history, settings=settings)
    assert len(history) == 4 and history[-1]["content"] == second
