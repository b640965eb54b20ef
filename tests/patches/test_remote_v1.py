"""--impl remote on a ChatGLM-6B directory's own (upstream-structured) code: the v1 generation patches fix
their own symptoms, and native and remote give the same logits, greedy answers and P-Tuning losses."""

import json
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

from glm_portable.backends import get_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.remote import load_remote
from glm_portable.patches import Context
from glm_portable.patches.generation_fixes import GENERATION_2D_POSITIONS, GENERATION_BOOLEAN_MASK
from glm_portable.training.options import TrainOptions
from glm_portable.training.run_dir import read_metrics
from glm_portable.training.trainer import run_training

CPU = Context.current("cpu")
PROMPTS = ["类型#裤*颜色#红色*风格#简约", "你好"]
GREEDY = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


@pytest.fixture(scope="module")
def loaded(remote_v1_dir):
    cpu = get_backend("cpu")
    return load_remote(remote_v1_dir, cpu, "float32"), load_model(remote_v1_dir, dtype="float32", device=cpu)


def test_remote_logits_with_upstreams_own_tokenizer_output_equal_native(loaded, remote_v1_dir):
    remote, native = loaded
    encoded = remote.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert encoded["attention_mask"].shape[1:] == (1, encoded["input_ids"].shape[1], encoded["input_ids"].shape[1])
    ours = load_tokenizer(remote_v1_dir).pad([load_tokenizer(remote_v1_dir).encode(p) for p in PROMPTS])
    assert torch.equal(encoded["input_ids"], ours["input_ids"]) and torch.equal(encoded["position_ids"],
                                                                                ours["position_ids"])
    with torch.no_grad():
        got = remote.model(**encoded).logits
        want = native(**ours).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert {"generation-2d-position-ids (modeling_chatglm.py)", "generation-boolean-mask (modeling_chatglm.py)",
            "tokenizer-init-order (tokenization_chatglm.py)"} <= set(remote.patches)


def test_batched_generate_on_our_inputs_equals_native(loaded, remote_v1_dir):
    remote, native = loaded
    tokenizer = load_tokenizer(remote_v1_dir)
    batch = tokenizer.pad([tokenizer.encode(p) for p in PROMPTS])
    want, got = native.generate(**batch, **GREEDY), remote.model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-4
    plain = {k: v for k, v in batch.items() if k != "position_ids"}  # generate() then makes its own 1-row ids
    assert torch.equal(remote.model.generate(**plain, **GREEDY).sequences, want.sequences)


@contextmanager
def without(patch, remote):
    """The remote model rebuilt as the Auto classes build it, from its module with ``patch`` reverted."""
    module = sys.modules[type(remote.model).__module__]
    patch.revert(module)
    try:
        model = add_generation_mixin_to_remote_model(module.ChatGLMForConditionalGeneration)(remote.model.config)
        model.load_state_dict(remote.model.state_dict())
        yield model.eval()
    finally:
        patch.apply(CPU, module)


def test_without_the_position_patch_generate_fails_as_upstream_does(loaded, remote_v1_dir):
    remote, _ = loaded
    tokenizer = load_tokenizer(remote_v1_dir)
    batch = tokenizer.pad([tokenizer.encode(p) for p in PROMPTS])
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with without(GENERATION_2D_POSITIONS, remote) as model:
        with pytest.raises(IndexError, match="too many indices"):
            model.generate(**plain, **GREEDY)
    with without(GENERATION_BOOLEAN_MASK, remote) as model:  # the other patch alone leaves this one's fix
        model.generate(**plain, **GREEDY)


def test_without_the_mask_patch_left_padding_is_attended(loaded, remote_v1_dir):
    remote, native = loaded
    tokenizer = load_tokenizer(remote_v1_dir)
    batch = tokenizer.pad([tokenizer.encode(p) for p in PROMPTS])
    want = native.generate(**batch, **GREEDY).logits
    with without(GENERATION_BOOLEAN_MASK, remote) as model:
        got = model.generate(**batch, **GREEDY).logits
    assert max((a - b)[1].abs().max().item() for a, b in zip(got, want)) > 1e-3  # the padded row changes
    assert max((a - b)[0].abs().max().item() for a, b in zip(got, want)) < 1e-4  # the unpadded one does not


def test_remote_chat_answers_as_native_chat(loaded, remote_v1_dir):
    from glm_portable.modeling import GenerationSettings, chat

    remote, native = loaded
    tokenizer = load_tokenizer(remote_v1_dir)
    ours, _ = chat(native, tokenizer, "你好", settings=GenerationSettings(max_new_tokens=6, do_sample=False))
    *_, (theirs, history) = remote.model.stream_chat(remote.tokenizer, "你好", [], max_new_tokens=6, do_sample=False)
    assert theirs == remote.model.process_response(ours) and history == [("你好", theirs)]


def test_remote_ptuning_trains_only_the_prefix_exactly_as_native(remote_v1_dir, tmp_path):
    rows = [{"content": f"类型#裤*颜色#{c}", "summary": "这条裤子" + "简约大方" * n} for n, c in
            enumerate(("红色", "白色", "黑色", "蓝色"), 1)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=remote_v1_dir, train_file=train, out=tmp_path / "data", num_shards=1))
    runs = {}
    for impl in ("native", "remote"):
        options = TrainOptions(model=remote_v1_dir, data=tmp_path / "data", output=tmp_path / impl, impl=impl,
                               pre_seq_len=4, lr=0.05, batch_size=2, grad_accum=1, max_steps=4, logging_steps=1,
                               save_steps=4)
        result = run_training(options, get_backend("cpu"), "test")
        assert {n for n, p in result.model.named_parameters() if p.requires_grad} == {
            "transformer.prefix_encoder.embedding.weight"}
        runs[impl] = tmp_path / impl
    losses = {impl: [m["loss"] for m in read_metrics(run)] for impl, run in runs.items()}
    assert len(losses["native"]) == 4 and losses["remote"] == pytest.approx(losses["native"], rel=1e-5)
    prefixes = [load_file(str(run / "checkpoint-4" / "model.safetensors")) for run in runs.values()]
    # Adam divides by the gradients' size (about 1e-5 on this random base), so fp32 rounding differences
    # between the two implementations reach the prefix at 1e-4 of its 0.2 total update.
    torch.testing.assert_close(*(p["transformer.prefix_encoder.embedding.weight"] for p in prefixes),
                               rtol=0, atol=1e-3)
