"""ChatGLM-6B (first generation): logits equal an independent reference, upstream's tokenizer ids on the real
file, THUDM's v1 data layout, the three methods train, batched serving equals chat, bad input is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm_portable.backends import get_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.data.preprocessing import load_preprocessed
from glm_portable.errors import UserError
from glm_portable.evaluation import load_for_inference
from glm_portable.modeling import GenerationSettings, chat, load_model, load_tokenizer
from glm_portable.modeling.tiny import make_tiny_model
from glm_portable.modeling.tokenizer_v1 import ChatGLM1Tokenizer
from glm_portable.serving.engine import GenerationEngine, Sampling
from glm_portable.serving.messages import prompt_ids
from glm_portable.training.options import TrainOptions
from glm_portable.training.run_dir import read_metrics
from glm_portable.training.trainer import run_training
from tests.training.test_deepspeed import _cli
from tests.modeling.reference_chatglm_v1 import positions_and_mask, reference_logits
from tests.serving.test_engine import ask_together
from tests.conftest import free_port

ASSETS = Path(os.environ.get("GLM_PORTABLE_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets"))
REAL_ICE_TEXT = ASSETS / "tokenizers" / "chatglm-6b.ice_text.model"
PROMPTS = ["类型#裤*颜色#红色*风格#简约", "你好", "hello  world\n\tx"]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny1", family="chatglm", seed=3)


@pytest.fixture(scope="module")
def tokenizer(v1_dir):
    return load_tokenizer(v1_dir)


def _state(model):
    return {k: v.float() for k, v in model.state_dict().items()}


def _reference(model, tokenizer, batch, prefix=None):
    ids = batch["input_ids"]
    positions, masked = positions_and_mask(ids.tolist(), tokenizer.bos_token_id, tokenizer.gmask_token_id,
                                           tokenizer.pad_token_id)
    assert torch.equal(positions, batch["position_ids"])
    return reference_logits(_state(model), model.config, ids, positions, masked, prefix)


def test_logits_equal_the_reference_alone_and_in_a_left_padded_batch(v1_dir, tokenizer):
    model = load_model(v1_dir, dtype="float32", device="cpu")
    for rows in ([tokenizer.encode(PROMPTS[0])], [tokenizer.encode(p) for p in PROMPTS]):
        batch = tokenizer.pad(rows)
        with torch.no_grad():
            logits = model(**batch).logits
        real = batch["attention_mask"].bool()
        assert (logits - _reference(model, tokenizer, batch))[real].abs().max() < 1e-4


@pytest.mark.parametrize("projection", [False, True])
def test_logits_with_a_prefix_equal_the_reference(v1_dir, tokenizer, projection):
    model = load_model(v1_dir, dtype="float32", device="cpu", pre_seq_len=3, prefix_projection=projection)
    config = model.config
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    batch = tokenizer.pad([tokenizer.encode(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.transformer.prefix_encoder(torch.arange(3))
        prefix = out.view(3, config.num_layers, 2, heads, dim).permute(1, 2, 0, 3, 4)[:, :, :, None]
        prefix = prefix.expand(-1, -1, -1, len(PROMPTS), -1, -1)
        logits = model(**batch).logits
    width = model.transformer.prefix_encoder.embedding.weight.shape[1]
    assert width == (config.hidden_size if projection else 2 * config.num_layers * config.hidden_size)
    real = batch["attention_mask"].bool()
    assert (logits - _reference(model, tokenizer, batch, prefix))[real].abs().max() < 1e-4


def test_cached_decoding_equals_the_reference_on_the_whole_sequence(v1_dir, tokenizer):
    model = load_model(v1_dir, dtype="float32", device="cpu")
    batch = tokenizer.pad([tokenizer.encode(p) for p in PROMPTS])
    steps = 5
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=[],
                         pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    full = out.sequences
    whole = {"input_ids": full,
             "attention_mask": torch.cat((batch["attention_mask"], torch.ones(len(PROMPTS), steps, dtype=torch.long)), 1)}
    whole["position_ids"] = positions_and_mask(full.tolist(), tokenizer.bos_token_id, tokenizer.gmask_token_id,
                                               tokenizer.pad_token_id)[0]
    reference = _reference(model, tokenizer, whole)
    width = batch["input_ids"].shape[1]
    assert max((out.logits[i] - reference[:, width - 1 + i]).abs().max().item() for i in range(steps)) < 1e-4


def test_next_positions_keep_the_position_and_count_the_block(tokenizer):
    batch = tokenizer.pad([tokenizer.encode("你好")])
    last = batch["position_ids"][..., -1:]
    assert tokenizer.advance_positions(batch["position_ids"]).tolist() == [[[last[0, 0, 0]], [last[0, 1, 0] + 1]]]


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    if not REAL_ICE_TEXT.is_file():
        pytest.skip(f"the real ChatGLM-6B tokenizer is not at {REAL_ICE_TEXT} (set GLM_PORTABLE_ASSETS)")
    directory = tmp_path_factory.mktemp("chatglm-6b")
    (directory / "ice_text.model").write_bytes(REAL_ICE_TEXT.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    return ChatGLM1Tokenizer.from_pretrained(directory)


# Upstream's ids for these texts (published in chatglm.cpp's tests of THUDM's final chatglm-6b revision).
UPSTREAM_IDS = [
    ("你好", [5, 74874, 130001, 130004]),
    ("[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n[Round 1]\n问：晚上睡不着应该怎么办\n答：",
     [53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4, 67342, 12, 74874, 130328, 130247, 130233, 130227, 35, 65806, 68241,
      75890, 14132, 5388, 340, 11, 21, 222, 6, 76693, 66877, 63852, 6, 66430, 68747, 102501, 63823, 4, 52, 6945, 5, 9,
      42, 4, 64286, 12, 65450, 83400, 64213, 66846, 4, 67342, 12, 130001, 130004]),
    ("def main():\n    print('hello world')\t# greeting",
     [1616, 594, 125936, 4, 130011, 2274, 89, 7283, 398, 125686, 130008, 61, 25672, 130001, 130004]),
]


@pytest.mark.parametrize("text,ids", UPSTREAM_IDS)
def test_the_real_tokenizer_gives_upstreams_ids(real_tokenizer, text, ids):
    assert real_tokenizer.encode(text) == ids


@pytest.mark.parametrize("text", ["你好", "def main():\n    print('hello world')\t# greeting",
                                  "line one\n\n  two   spaces\tand a tab", "English words, and 中文。"])
def test_the_real_tokenizer_decodes_what_it_encoded(real_tokenizer, text):
    assert real_tokenizer.decode(real_tokenizer.encode(text)) == text


def test_the_image_token_offset_comes_from_tokenizer_config(real_tokenizer, tmp_path):
    (tmp_path / "ice_text.model").write_bytes(REAL_ICE_TEXT.read_bytes())
    first_release = ChatGLM1Tokenizer.from_pretrained(tmp_path)  # no tokenizer_config.json: upstream's 20000
    assert first_release.encode("你好") == [i + 20000 for i in real_tokenizer.encode("你好")]
    assert (first_release.gmask_token_id, first_release.bos_token_id, first_release.eos_token_id) == (150001, 150004, 150005)
    assert first_release.decode(first_release.encode("你好")) == "你好"


def test_the_tiny_tokenizer_rewrites_whitespace_into_pieces(tokenizer):
    text = "a\nb\tc" + " " * 7 + "d"
    pieces = [tokenizer.sp.id_to_piece(i - tokenizer.num_image_tokens) for i in tokenizer.encode_text(text)]
    assert {"<n>", "<|tab|>", "<|blank_7|>"} <= set(pieces)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.fixture(scope="module")
def v1_data(v1_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("v1-data")
    rows = [{"content": f"类型#裤*颜色#{c}", "summary": f"这条{c}的裤子简约大方。", "history": []}
            for c in ["红色", "白色", "黑色", "蓝色"]] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    preprocess(PreprocessOptions(model=v1_dir, train_file=root / "train.jsonl", eval_file=root / "train.jsonl",
                                 out=root / "data", history_column="history", max_source_length=24,
                                 max_target_length=16, num_shards=1))
    return root / "data"


def test_preprocessing_follows_thudms_v1_layout(v1_data, tokenizer):
    manifest = json.loads((v1_data / "manifest.json").read_text())
    assert manifest["template"] == "chatglm-v1"
    row = load_preprocessed(v1_data, "train")[0]
    prompt = tokenizer.encode_text("[Round 0]\n问：类型#裤*颜色#红色\n答：")  # a history column, even empty
    answer = tokenizer.encode_text("这条红色的裤子简约大方。")
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    assert row["input_ids"] == prompt[:23] + [gmask, sop] + answer[:14] + [eop]
    assert row["labels"] == [-100] * (len(prompt[:23]) + 1) + [sop] + answer[:14] + [eop]
    eval_row = load_preprocessed(v1_data, "eval")[0]
    assert eval_row["input_ids"] == prompt[:22] + [gmask, sop]


def _train(v1_dir, v1_data, output, **kwargs):
    options = TrainOptions(model=v1_dir, data=v1_data, output=output, batch_size=4, grad_accum=1, max_steps=16,
                           logging_steps=4, save_steps=16, **kwargs)
    return run_training(options, get_backend("cpu"), "test")


def test_ptuning_trains_the_prefix_alone_and_its_loss_falls(v1_dir, v1_data, tmp_path):
    result = _train(v1_dir, v1_data, tmp_path / "run", method="ptuning", pre_seq_len=4, lr=0.5)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    saved = load_file(tmp_path / "run" / "checkpoint-16" / "model.safetensors")
    assert set(saved) == {"transformer.prefix_encoder.embedding.weight"}
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02  # a random base moves slowly


def test_lora_and_full_fine_tuning_train(v1_dir, v1_data, tmp_path):
    _train(v1_dir, v1_data, tmp_path / "lora", method="lora", lr=5e-2)
    lora = [m["loss"] for m in read_metrics(tmp_path / "lora")]
    assert all(b < a for a, b in zip(lora, lora[1:])) and lora[-1] < lora[0] - 0.05
    adapter = json.loads((tmp_path / "lora" / "checkpoint-16" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) >= {"query_key_value"}
    done = _cli("--model", v1_dir, "--data", v1_data, "--output", tmp_path / "full", "--method", "full",
                "--deepspeed", "zero2", "--lr", "1e-3", "--batch-size", "4", "--max-steps", "16", "--logging-steps", "4",
                "--save-steps", "16", "--device", "cpu", "--master-port", free_port())
    assert done.returncode == 0, done.stderr[-2000:]
    full = [m["loss"] for m in read_metrics(tmp_path / "full")]
    assert full[-1] < full[0]


def test_batched_serving_answers_as_chat_does(v1_dir, tokenizer):
    model = load_for_inference(v1_dir, None, get_backend("cpu"), "float32")
    questions = ["你好", "类型#裤*颜色#红色", "hello there"]
    alone = {q: chat(model, tokenizer, q, settings=GenerationSettings(max_new_tokens=8, do_sample=False))[0]
             for q in questions}
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, batch_wait_s=0.2).start()
    try:
        assert ask_together(engine, tokenizer, questions, Sampling(8, temperature=0)) == alone
    finally:
        engine.stop()


def test_the_v1_chat_prompt_counts_rounds_from_zero(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}]
    assert prompt_ids(tokenizer, messages) == tokenizer.encode("[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答：")
    assert prompt_ids(tokenizer, messages[2:]) == tokenizer.encode("q")


def test_bad_v1_input_is_refused_with_one_message(v1_dir, v1_data, tiny_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    (bare / "config.json").write_text((Path(v1_dir) / "config.json").read_text())
    with pytest.raises(UserError, match="ice_text.model"):
        load_tokenizer(bare)
    with pytest.raises(UserError, match="preprocessed for another model"):
        run_training(TrainOptions(model=tiny_dir, data=v1_data, output=tmp_path / "run", max_steps=1),
                     get_backend("cpu"), "test")
    with pytest.raises(UserError, match="--kv-groups"):
        make_tiny_model(tmp_path / "m", family="chatglm", kv_groups=2)
    assert not (tmp_path / "m").exists()
