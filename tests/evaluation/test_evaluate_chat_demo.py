import json
import subprocess
import sys

import pytest

from glm_portable.backends import get_backend, select_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.data.synthetic import adgen_rows
from glm_portable.evaluation import METRIC_KEYS, EvalOptions, evaluation_settings, evaluate, generate_batched, score
from glm_portable.modeling import GenerationSettings, chat, load_model, load_tokenizer
from glm_portable.training.options import TrainOptions
from glm_portable.training.trainer import run_training


@pytest.fixture(scope="module")
def data_dir(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    rows = adgen_rows(48, seed=3)
    (root / "train.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:36]))
    (root / "dev.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[36:]))
    preprocess(PreprocessOptions(model=tiny_dir, train_file=root / "train.json", eval_file=root / "dev.json", out=root / "data"))
    return root


def test_batched_greedy_generation_equals_batch_size_one(tiny_dir, data_dir):
    import datasets

    model = load_model(tiny_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(tiny_dir)
    prompts = [list(p) for p in datasets.load_from_disk(str(data_dir / "data" / "eval"))["input_ids"]]
    prompts += [prompts[0][:5], prompts[1] + prompts[2][2:]]
    settings = evaluation_settings(max_new_tokens=12)
    assert generate_batched(model, tok, prompts, 32, settings) == generate_batched(model, tok, prompts, 1, settings)


def test_evaluating_a_ptuning_checkpoint_equals_the_trained_model_in_memory(tiny_dir, data_dir, tmp_path):
    options = TrainOptions(model=tiny_dir, data=data_dir / "data", output=tmp_path / "run", pre_seq_len=8, lr=0.3,
                           batch_size=4, grad_accum=1, max_steps=10, logging_steps=5, save_steps=10)
    trained = run_training(options, get_backend("cpu"), "test").model
    in_memory = evaluate(EvalOptions(model=tiny_dir, data=data_dir / "data", output=tmp_path / "a", max_new_tokens=16),
                         get_backend("cpu"), model=trained)
    from_disk = evaluate(EvalOptions(model=tiny_dir, data=data_dir / "data", output=tmp_path / "b", max_new_tokens=16,
                                     checkpoint=tmp_path / "run"), get_backend("cpu"))
    a = (tmp_path / "a" / "generated_predictions.txt").read_text()
    assert a == (tmp_path / "b" / "generated_predictions.txt").read_text()
    assert {k: in_memory[k] for k in ("bleu-4", "rouge-l")} == {k: from_disk[k] for k in ("bleu-4", "rouge-l")}
    first = json.loads(a.splitlines()[0])
    assert set(first) == {"labels", "predict"}
    results = json.loads((tmp_path / "b" / "eval_results.json").read_text())
    assert {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "samples", "empty_predictions", "settings"} <= set(results)
    assert results["samples"] == 12
    assert set(results["full_reference"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    thudm = json.loads((tmp_path / "b" / "predict_results.json").read_text())
    assert thudm["predict_bleu-4"] == results["bleu-4"] and thudm["predict_samples"] == 12
    assert json.loads((tmp_path / "b" / "all_results.json").read_text()) == thudm


def test_scores_use_thudm_cut_references_and_report_full_ones_beside(tiny_dir, data_dir, tmp_path):
    """Answers longer than max_target_length: THUDM's references are cut, so the two scores differ."""
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。" * 12} for c in ("红色", "白色", "黑色")]
    raw = tmp_path / "long.jsonl"
    raw.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    results = evaluate(EvalOptions(model=tiny_dir, data=raw, output=tmp_path / "e", max_target_length=16,
                                   max_new_tokens=4), get_backend("cpu"))
    lines = [json.loads(line) for line in (tmp_path / "e" / "generated_predictions.txt").read_text().splitlines()]
    tok = load_tokenizer(tiny_dir)
    assert [line["labels"] for line in lines] == [tok.sp.decode(tok.sp.encode(r["summary"])[:14]) for r in rows]
    predictions = [line["predict"] for line in lines]
    cut, full = (score(predictions, labels).summary() for labels in
                 ([line["labels"] for line in lines], [r["summary"] for r in rows]))
    assert {k: results[k] for k in METRIC_KEYS} == {k: cut[k] for k in METRIC_KEYS}
    assert results["full_reference"] == {k: full[k] for k in METRIC_KEYS}


def test_evaluate_reads_raw_files_too(tiny_dir, data_dir, tmp_path):
    results = evaluate(EvalOptions(model=tiny_dir, data=data_dir / "dev.json", output=tmp_path / "raw",
                                   max_new_tokens=4, limit=3), select_backend("cpu").backend)
    assert results["samples"] == 3


def test_chat_one_shot_prints_the_answer(tiny_dir):
    out = subprocess.run([sys.executable, "-m", "glm_portable.cli", "chat", "--model", str(tiny_dir), "--query", "你好",
                          "--greedy", "--max-new-tokens", "8", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model, tok = load_model(tiny_dir, device="cpu"), load_tokenizer(tiny_dir)
    expected, _ = chat(model, tok, "你好", settings=GenerationSettings(max_new_tokens=8, do_sample=False))
    assert out.stdout.rstrip("\n") == expected


def test_ctrl_c_stops_the_answer_and_chat_goes_on(tiny_dir):
    """The answer stops, the prompt comes back, /exit leaves with 0 (it used to abort with 134)."""
    import os
    import signal
    import threading
    import time

    # A terminal's Ctrl-C: the chat gets SIGINT's default action even when the tests were started as a background
    # job, whose children inherit an ignored SIGINT.
    process = subprocess.Popen([sys.executable, "-m", "glm_portable.cli", "chat", "--model", str(tiny_dir), "--greedy",
                                "--max-new-tokens", "8000", "--device", "cpu"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = bytearray()
    threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: os.read(process.stdout.fileno(), 4096), b"")],
                     daemon=True).start()

    def wait_for(condition):
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert condition(), out.decode(errors="replace")

    wait_for(lambda: out.count(b"you>") == 1)
    # The random tiny model's text may end in a half character for a long while, which chat holds back, so the
    # interrupt goes after 30 bytes or a second of generation; an answer that ended first is asked again.
    for _ in range(3):
        prompts, shown, asked = out.count(b"you>"), len(out), time.monotonic()
        process.stdin.write("类型#裙\n".encode())
        process.stdin.flush()
        wait_for(lambda: len(out) > shown + 30 or time.monotonic() - asked > 1 or out.count(b"you>") > prompts)
        if out.count(b"you>") == prompts:
            break
    process.send_signal(signal.SIGINT)
    wait_for(lambda: b"[stopped]" in out and out.count(b"you>") == prompts + 1)
    process.stdin.write(b"/exit\n")
    process.stdin.flush()
    assert process.wait(timeout=60) == 0


def test_demo_end_to_end_beats_the_untrained_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "glm_portable.cli", "demo", "--output", str(tmp_path / "demo"),
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert report["after"]["bleu-4"] > report["before"]["bleu-4"] + 30
    assert report["after"]["rouge-l"] > report["before"]["rouge-l"] + 30
    assert "bleu-4" in out.stdout and (tmp_path / "demo" / "run" / "loss.png").is_file()


def test_demo_never_replaces_a_directory_it_did_not_make(tmp_path):
    from glm_portable.demo import DemoOptions, run_demo
    from glm_portable.errors import UserError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not made by `glm-portable demo`"):
        run_demo(DemoOptions(output=tmp_path, method="lora"), select_backend("cpu"))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_prefix_trained_on_a_quantized_base_evaluates_on_either_base_and_records_the_bits(tiny_dir, data_dir,
                                                                                              tmp_path):
    options = TrainOptions(model=tiny_dir, data=data_dir / "data", output=tmp_path / "run", pre_seq_len=8, lr=0.3,
                           batch_size=4, grad_accum=1, max_steps=6, logging_steps=3, save_steps=6, quantization_bit=4)
    trained = run_training(options, get_backend("cpu"), "test").model
    common = dict(model=tiny_dir, data=data_dir / "data", max_new_tokens=8, checkpoint=tmp_path / "run", limit=4)
    in_memory = evaluate(EvalOptions(output=tmp_path / "a", **{k: v for k, v in common.items() if k != "checkpoint"}),
                         get_backend("cpu"), model=trained)
    quantized = evaluate(EvalOptions(output=tmp_path / "q", quantization_bit=4, **common), get_backend("cpu"))
    unquantized = evaluate(EvalOptions(output=tmp_path / "u", **common), get_backend("cpu"))
    predictions = {name: (tmp_path / name / "generated_predictions.txt").read_text() for name in "aqu"}
    assert predictions["a"] == predictions["q"]
    assert in_memory["settings"]["quantization_bit"] == 4 and quantized["settings"]["quantization_bit"] == 4
    assert unquantized["settings"]["quantization_bit"] is None and unquantized["samples"] == 4


@pytest.mark.parametrize("command,extra", [("evaluate", ["--data", "x", "--output", "y"]), ("chat", ["--query", "hi"]),
                                           ("serve", [])])
def test_an_unknown_bit_width_exits_2_on_every_command(tiny_dir, command, extra):
    out = subprocess.run([sys.executable, "-m", "glm_portable.cli", command, "--model", str(tiny_dir), *extra,
                          "--quantization-bit", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--quantization-bit 3: expected one of 4, 8" in out.stderr, out.stderr


@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_decoding_on_a_static_cache_gives_the_dynamic_caches_answers(tiny_dir, data_dir, pre_seq_len):
    import datasets

    model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=pre_seq_len)
    tok = load_tokenizer(tiny_dir)
    prompts = [list(p) for p in datasets.load_from_disk(str(data_dir / "data" / "eval"))["input_ids"]][:6]
    prompts.append(prompts[0][:5])  # a short row: left padding in the batch
    settings = evaluation_settings(max_new_tokens=10)
    dynamic = generate_batched(model, tok, prompts, 7, settings)
    assert generate_batched(model, tok, prompts, 7, settings, static_cache=True) == dynamic


@pytest.mark.parametrize("family", ["chatglm3", "chatglm"])
def test_generate_feeds_only_the_new_token_after_the_prompt(tiny_dir, tmp_path, family):
    """transformers 5.24 hands generate's cache over as ``cache``; a model that missed it would recompute the whole
    sequence at every step (right answers, quadratic cost)."""
    from glm_portable.modeling.tiny import make_tiny_model

    model_dir = tiny_dir if family == "chatglm3" else make_tiny_model(tmp_path / "v1", family="chatglm", seed=3)
    model = load_model(model_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(model_dir)
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    batch = tok.pad([tok.encode("你好"), tok.encode("类型#裙*颜色#红色")])
    model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert widths[0] == batch["input_ids"].shape[1] and widths[1:] == [1, 1, 1]
