"""The OpenAI-compatible API against a live server, through the official openai client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from glm_portable.modeling import load_tokenizer
from glm_portable.serving.messages import prompt_ids

from .conftest import ENV, running_server

QUESTION = "类型#裙*颜色#红色"


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(server, content: str = QUESTION, max_tokens: int = 24, **extra):
    return client(server).chat.completions.create(
        model="tiny3", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens, **extra)


def test_models_and_health(served):
    assert [m.id for m in client(served).models.list().data] == ["tiny3"]
    health = served.health()
    assert health["status"] == "ok" and health["model"] == "tiny3" and health["auth"] is False


def test_greedy_completion_equals_chat_greedy_and_counts_usage(served, tiny_dir):
    answer = subprocess.run([sys.executable, "-m", "glm_portable.cli", "chat", "--model", str(tiny_dir), "--query",
                             QUESTION, "--greedy", "--max-new-tokens", "24"], capture_output=True, text=True,
                            env=ENV, timeout=300, check=True).stdout.rstrip("\n")
    completion = greedy(served)
    assert completion.choices[0].message.content == answer
    assert completion.object == "chat.completion" and completion.model == "tiny3"
    usage = completion.usage
    expected_prompt = len(prompt_ids(load_tokenizer(tiny_dir), [{"role": "user", "content": QUESTION}]))
    assert usage.prompt_tokens == expected_prompt
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if completion.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 24
    else:
        assert completion.choices[0].finish_reason == "stop" and usage.completion_tokens <= 24


def test_streamed_chunks_add_up_to_the_plain_answer(served):
    plain = greedy(served).choices[0].message.content
    chunks = list(client(served).chat.completions.create(
        model="tiny3", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    contents = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 1, "the answer came in one piece, not streamed"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_raw_stream_ends_with_done(served):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)


def test_stop_sequences_cut_the_answer_plain_and_streamed(served):
    full = greedy(served, max_tokens=40).choices[0].message.content
    stop = full[6:8]
    expected = full[:full.find(stop)].rstrip()
    cut = greedy(served, max_tokens=40, stop=[stop, "never-generated"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client(served).chat.completions.create(
        model="tiny3", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40, stop=stop,
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_a_seed_repeats_a_sampled_answer(served):
    def sampled(seed):
        return client(served).chat.completions.create(
            model="tiny3", messages=[{"role": "user", "content": QUESTION}], temperature=1.0, top_p=0.9, seed=seed,
            max_tokens=16).choices[0].message.content

    assert sampled(7) == sampled(7)


def test_conversation_roles_reach_the_prompt(served):
    one = greedy(served, content="你好").choices[0].message.content
    with_history = client(served).chat.completions.create(
        model="tiny3", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": "好的"}, {"role": "user", "content": "你好"}])
    assert with_history.usage.prompt_tokens > greedy(served, content="你好").usage.prompt_tokens
    assert isinstance(with_history.choices[0].message.content, str) and isinstance(one, str)


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(served):
    prompts = [f"{QUESTION}{i}" for i in range(8)]
    alone = {p: greedy(served, content=p, max_tokens=12).choices[0].message.content for p in prompts}
    before = served.health()["batches"]
    together: dict[str, str] = {}

    def ask(p):
        together[p] = greedy(served, content=p, max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert served.health()["batches"] - before <= 3, "concurrent requests were decoded one at a time"


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages.1.role"),
    ({"messages": [{"role": "user", "content": QUESTION * 2000}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 422, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{served.url}/v1/chat/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_the_openai_client_sees_errors_as_its_own_exceptions(served):
    with pytest.raises(openai.BadRequestError) as caught:
        client(served).chat.completions.create(model="tiny3", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.status_code == 400 and "robot" in caught.value.message


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines), next(lines), next(lines)
        assert served.health()["active"] == 1
    deadline = time.monotonic() + 3
    while served.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.health()["active"] == 0
    assert greedy(served, max_tokens=4).choices[0].message.content is not None


def test_api_key_is_required_when_set_and_sigterm_stops_cleanly(tiny_dir):
    with running_server(tiny_dir, env={"GLM_PORTABLE_API_KEY": "s3cret"}) as server:
        assert httpx.get(f"{server.url}/health").json()["auth"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert greedy_with_key(server, "s3cret")
        assert server.stop() == 0
        assert "server stopped" in "".join(server.output)


def greedy_with_key(server, key):
    return client(server, key).chat.completions.create(
        model="tiny3", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=4).choices[0].message


def test_serve_refuses_a_busy_port_and_bad_options(tiny_dir, served):
    port = served.url.rsplit(":", 1)[1]
    busy = subprocess.run([sys.executable, "-m", "glm_portable.cli", "serve", "--model", str(tiny_dir), "--port", port],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert busy.returncode == 2 and "cannot listen" in busy.stderr and "Traceback" not in busy.stderr
    for args, message in ((["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
                          (["--impl", "other"], "--impl 'other': expected one of native, remote")):
        bad = subprocess.run([sys.executable, "-m", "glm_portable.cli", "serve", "--model", str(tiny_dir), *args],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_remote_code_with_a_checkpoint_serves_what_native_chat_answers(remote_base, runs):
    answer = subprocess.run([sys.executable, "-m", "glm_portable.cli", "chat", "--model", str(remote_base),
                             "--checkpoint", str(runs["lora"]), "--query", QUESTION, "--greedy",
                             "--max-new-tokens", "24"], capture_output=True, text=True, env=ENV, timeout=300,
                            check=True).stdout.rstrip("\n")
    with running_server(remote_base, "--impl", "remote", "--checkpoint", str(runs["lora"])) as server:
        assert [m.id for m in client(server).models.list().data] == ["lora"]
        completion = client(server).chat.completions.create(
            model="lora", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24)
        assert completion.choices[0].message.content == answer
        assert "(chatglm3, remote)" in "".join(server.output)
