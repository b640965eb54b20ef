"""The batched engine and the message conversion, in process: batched greedy answers equal `chat`."""

from __future__ import annotations

import threading

import pytest

from glm_portable.backends import get_backend
from glm_portable.evaluation import load_for_inference
from glm_portable.modeling import GenerationSettings, chat, chatglm2_prompt, load_tokenizer
from glm_portable.serving.engine import GenerationEngine, Request, Sampling, _safe_end
from glm_portable.serving.messages import MessageError, prompt_ids

QUESTIONS = ["你好", "类型#裙*颜色#红色", "hello there", "a"]


def ask_together(engine, tokenizer, questions, sampling):
    answers = {}

    def ask(question):
        parts, finished = [], threading.Event()

        def deliver(event):
            parts.append(event.text)
            if event.finish_reason or event.error:
                finished.set()

        engine.submit(Request(prompt_ids(tokenizer, [{"role": "user", "content": question}]), sampling, deliver))
        finished.wait(120)
        answers[question] = "".join(parts)

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


@pytest.mark.parametrize("method,static_cache", [(None, False), ("lora", False), ("ptuning", False), (None, True),
                                                 ("ptuning", True)])
def test_a_batch_answers_as_chat_does_one_at_a_time(remote_base, runs, method, static_cache):
    model = load_for_inference(remote_base, runs[method] if method else None, get_backend("cpu"), "float32")
    tokenizer = load_tokenizer(remote_base)
    alone = {q: chat(model, tokenizer, q, settings=GenerationSettings(max_new_tokens=12, do_sample=False))[0]
             for q in QUESTIONS}
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, batch_wait_s=0.2, static_cache=static_cache).start()
    try:
        assert ask_together(engine, tokenizer, QUESTIONS, Sampling(12, temperature=0)) == alone
        assert engine.batches == 1
    finally:
        engine.stop()


def test_text_is_held_back_while_it_may_become_a_stop_string():
    assert _safe_end("答案是 AB", ["ABC"]) == len("答案是")
    assert _safe_end("答案是 \ufffd", []) == len("答案是")
    assert _safe_end("答案", ["xyz"]) == 2


def test_chatglm2_folds_the_system_message_into_the_first_question(tiny2_dir):
    tokenizer = load_tokenizer(tiny2_dir)
    messages = [{"role": "system", "content": "简短"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "嗨"}, {"role": "user", "content": [{"type": "text", "text": "再见"}]}]
    expected = tokenizer.encode(chatglm2_prompt("再见", [{"role": "user", "content": "简短\n你好"},
                                                         {"role": "assistant", "content": "嗨"}]))
    assert prompt_ids(tokenizer, messages) == expected
    with pytest.raises(MessageError) as caught:
        prompt_ids(tokenizer, [{"role": "tool", "content": "{}"}])
    assert caught.value.param == "messages.0.role"


def test_chatglm3_takes_tool_results_as_observations(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "天气"}, {"role": "assistant", "content": "查询中"},
                                 {"role": "tool", "content": "晴"}])
    assert tokenizer.get_command("<|observation|>") in ids and ids[-1] == tokenizer.get_command("<|assistant|>")
