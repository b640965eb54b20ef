import json

import pytest

from glm_portable.errors import UserError
from glm_portable.modeling import ChatGLMTokenizer, chat_input_ids, chatglm2_prompt, chatglm3_ids, load_tokenizer
from glm_portable.modeling.tokenizer import detect_family


def test_special_tokens_follow_the_sentencepiece_vocabulary(tiny_dir, tiny2_dir):
    v3, v2 = load_tokenizer(tiny_dir), load_tokenizer(tiny2_dir)
    n = v3.sp_vocab_size
    assert [v3.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == list(range(n, n + 5))
    assert [v3.get_command(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == list(range(n + 5, n + 9))
    with pytest.raises(KeyError):
        v2.get_command("<|user|>")
    assert (v3.bos_token_id, v3.eos_token_id, v3.pad_token_id) == (1, 2, 0)
    assert v3.stop_ids == [2, v3.get_command("<|user|>"), v3.get_command("<|observation|>")]
    assert v2.stop_ids == [2]


def test_encode_prefixes_gmask_sop_and_truncates_like_upstream(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = tok.encode("这条裙子采用了柔软的棉质面料")
    assert ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
    assert ids[2:] == tok.encode_text("这条裙子采用了柔软的棉质面料")
    assert len(tok.encode("这条裙子采用了柔软的棉质面料", max_length=5)) == 5
    assert tok.encode("abc", add_special_tokens=False) == tok.encode_text("abc")


def test_padding_is_left_with_positions_from_zero(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    batch = tok(["短", "这是一个更长的句子"])
    row = batch["input_ids"][0].tolist()
    width = len(row)
    real = len(tok.encode("短"))
    assert row[: width - real] == [0] * (width - real)
    assert batch["attention_mask"][0].tolist() == [0] * (width - real) + [1] * real
    assert batch["position_ids"][0].tolist() == [0] * (width - real) + list(range(real))


def test_decode_drops_specials_and_round_trips_text(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    text = "Hello 你好\n世界 123"
    ids = tok.encode(text) + [tok.get_command("<|user|>"), tok.eos_token_id]
    assert tok.decode(ids) == text
    assert "<|user|>" in tok.decode(ids, skip_special_tokens=False)


def test_chatglm2_round_prompt():
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert chatglm2_prompt("天气如何") == "[Round 1]\n\n问：天气如何\n\n答："
    assert chatglm2_prompt("天气如何", history) == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：天气如何\n\n答："


def test_chatglm3_role_format(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    history = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "嗨"}, {"role": "assistant", "content": "嗨！"}]
    ids = chatglm3_ids(tok, "再见", history)
    expected = tok.prefix_ids
    for role, content in [("system", "你是助手"), ("user", "嗨"), ("assistant", "嗨！"), ("user", "再见")]:
        expected = expected + [tok.get_command(f"<|{role}|>")] + tok.encode_text("\n") + tok.encode_text(content)
    assert ids == expected + [tok.get_command("<|assistant|>")]
    assert chat_input_ids(tok, "再见", history) == ids


def test_chat_input_for_chatglm2_is_the_encoded_round_prompt(tiny2_dir):
    tok = load_tokenizer(tiny2_dir)
    assert chat_input_ids(tok, "你好") == tok.encode(chatglm2_prompt("你好"))


def test_save_and_load_round_trip_and_family_detection(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.family == "chatglm3" and again.fingerprint() == tok.fingerprint()
    assert again.encode("类型#裙") == tok.encode("类型#裙")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["glm_portable_family"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert detect_family(tmp_path) == "chatglm2"
    (tmp_path / "tokenization_chatglm.py").write_text("specials = ['<|user|>', '<|observation|>']")
    assert detect_family(tmp_path) == "chatglm3"
    assert ChatGLMTokenizer(tmp_path / "tokenizer.model", "chatglm2").fingerprint() != tok.fingerprint()


def test_missing_or_misplaced_v1_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"")
    with pytest.raises(UserError, match="no first-generation config.json"):
        load_tokenizer(tmp_path)
