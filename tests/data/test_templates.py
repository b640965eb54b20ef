"""Token ids and labels against an independent, row-by-row computation of the rules in docs/thudm-compatibility.md."""

import pytest

from glm_portable.data.formats import Example
from glm_portable.data.templates import TEMPLATES, template_for
from glm_portable.modeling import load_tokenizer
from glm_portable.modeling.prompts import chatglm1_prompt

ROWS = [
    ("类型#裙*颜色#红色*风格#简约", "这条红色的裙子简约大方，适合日常穿着。"),
    ("类型#上衣*材质#棉*颜色#白色*风格#休闲*衣样式#衬衫*衣领型#圆领" * 3, "白色的棉质衬衫。" * 40),
]


def _example(query, answer, history=()):
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Example("f:1", tuple(messages + [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]))


def thudm_v2(tokenizer, query, answer, history, max_source, max_target, prefix=""):
    """ChatGLM2 ptuning/main.py preprocess_function_train, unpadded."""
    prompt = ""
    for i, (q, a) in enumerate(history):
        prompt += "[Round {}]\n\n问：{}\n\n答：{}\n\n".format(i + 1, q, a)
    prompt = prefix + prompt + "[Round {}]\n\n问：{}\n\n答：".format(len(history) + 1, query)
    a_ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + tokenizer.sp.encode(prompt)[: max_source - 2]
    b_ids = tokenizer.sp.encode(answer)[:max_target]
    input_ids = a_ids + b_ids + [tokenizer.eos_token_id]
    labels = [tokenizer.pad_token_id] * len(a_ids) + b_ids + [tokenizer.eos_token_id]
    return input_ids, [(t if t != tokenizer.pad_token_id else -100) for t in labels]


def thudm_v3(tokenizer, conversation, max_length):
    """ChatGLM3 finetune_demo process_batch (no tools)."""
    input_ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    loss_masks = [False, False]
    for message in conversation:
        new = [tokenizer.get_command(f"<|{message['role']}|>")] + tokenizer.sp.encode("\n") + tokenizer.sp.encode(message["content"])
        input_ids += new
        loss_masks += [message["role"] not in ("system", "user")] * len(new)
    input_ids.append(tokenizer.eos_token_id)
    loss_masks = [False, *loss_masks]
    labels = [i if m else -100 for i, m in zip(input_ids, loss_masks)]
    return input_ids[:max_length], labels[:max_length]


@pytest.mark.parametrize("history", [(), (("你好", "你好！"), ("天气如何", "很好"))])
def test_chatglm2_rows_equal_thudm(tiny2_dir, history):
    tok = load_tokenizer(tiny2_dir)
    examples = [_example(q, a, history) for q, a in ROWS]
    out = TEMPLATES["chatglm2"].encode_train(tok, examples, 64, 128, source_prefix="前缀：")
    for (q, a), ids, labels in zip(ROWS, out.input_ids, out.labels):
        assert (ids, labels) == thudm_v2(tok, q, a, history, 64, 128, prefix="前缀：")
    assert out.source_truncated == (2 if history else 1) and out.target_truncated == 1
    evaluated = TEMPLATES["chatglm2"].encode_eval(tok, examples, 64, 128, source_prefix="前缀：")
    assert evaluated.input_ids[0] == thudm_v2(tok, *ROWS[0], history, 64, 128, prefix="前缀：")[0][: len(evaluated.input_ids[0])]
    assert evaluated.full_references == [a for _, a in ROWS]
    assert evaluated.references == [tok.sp.decode(tok.sp.encode(a)[:126]) for _, a in ROWS]  # [gMASK] sop count
    assert evaluated.references[0] == ROWS[0][1] and len(evaluated.references[1]) < len(ROWS[1][1])


def test_chatglm3_rows_equal_thudm_finetune_demo(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    conversation = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                    {"role": "assistant", "content": "你好！"}, {"role": "user", "content": ROWS[0][0]},
                    {"role": "assistant", "content": ROWS[0][1]}]
    examples = [Example("f:1", tuple(conversation)), _example(*ROWS[1])]
    out = template_for(tok).encode_train(tok, examples, 64, 128)
    assert (out.input_ids[0], out.labels[0]) == thudm_v3(tok, conversation, 193)
    assert (out.input_ids[1], out.labels[1]) == thudm_v3(tok, examples[1].messages, 193)
    assert out.target_truncated == 1 and len(out.input_ids[1]) == 193
    assistant = tok.get_command("<|assistant|>")
    position = out.input_ids[0].index(assistant)
    assert out.labels[0][position] == -100 and out.labels[0][position + 1] != -100


def thudm_v3_eval(tokenizer, conversation, max_input, max_output):
    """ChatGLM3 finetune_demo process_batch_eval: (prompt ids, decoded label) per assistant turn."""
    input_ids, rows = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")], []
    for message in conversation:
        if len(input_ids) >= max_input:
            break
        new = [tokenizer.get_command(f"<|{message['role']}|>")] + tokenizer.sp.encode("\n") + tokenizer.sp.encode(message["content"])
        if message["role"] == "assistant":
            output = (new[1:] + [tokenizer.eos_token_id])[:max_output]
            rows.append((input_ids[:max_input] + new[:1], tokenizer.sp.decode([t for t in output if t < tokenizer.sp_vocab_size and t != tokenizer.eos_token_id]).strip()))
        input_ids += new
    return rows


def test_chatglm3_eval_rows_per_assistant_turn_equal_thudm(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    conversation = ({"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                    {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再写一条"},
                    {"role": "assistant", "content": ROWS[1][1]})
    examples = [Example("f:1", conversation), _example(*ROWS[1]), _example(*ROWS[0])]
    out = template_for(tok).encode_eval(tok, examples, 64, 16)
    expected = [row for e in examples for row in thudm_v3_eval(tok, e.messages, 64, 16)]
    assert len(expected) == 3, "the long prompt of the second conversation fills max_input: its turn is dropped"
    assert list(zip(out.input_ids, out.references)) == expected
    assert out.full_references == ["你好！", ROWS[1][1], ROWS[0][1]]
    assert out.source_truncated == 1
    assistant = tok.get_command("<|assistant|>")
    assert all(ids[-1] == assistant and ids[:2] == tok.prefix_ids for ids in out.input_ids)


class V1Tokenizer:
    """A stand-in for ChatGLM-6B's tokenizer: character ids, its own special ids."""

    family = "chatglm"
    commands = {"[gMASK]": 130001, "sop": 130004, "eop": 130005}
    pad_token_id = 3

    def get_command(self, token):
        return self.commands[token]

    def encode_batch(self, texts, num_threads=1):
        return [[ord(c) for c in t] for t in texts]


def test_chatglm_v1_layout():
    tok = V1Tokenizer()
    out = TEMPLATES["chatglm"].encode_train(tok, [_example("abcdef", "xyz")], 5, 4)
    a, b = [ord(c) for c in "abcd"], [ord(c) for c in "xy"]
    assert out.input_ids[0] == a + [130001, 130004] + b + [130005]
    assert out.labels[0] == [-100] * 5 + [130004] + b + [130005]
    assert TEMPLATES["chatglm"].fixed_length(64, 128) == 192
    assert chatglm1_prompt("q", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == \
        "[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："
