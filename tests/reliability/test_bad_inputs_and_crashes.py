"""The reliability probe's cases, replayed: user files are never deleted, crashes lose nothing, one writer
per directory, resumed files are the ones the run wrote, user mistakes get exit 2 and one message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from glm_portable.atomic import atomic_directory
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.locking import lock_path
from glm_portable.training.run_dir import COMPLETE, complete_checkpoints, mark_complete, rotate_checkpoints

ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
       "GLM_PORTABLE_DEVICE": "cpu"}
ROWS = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子。"} for c in ("红色", "白色", "黑色", "蓝色")] * 2


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "glm_portable.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def refused(result, *words):
    text = result.stderr + result.stdout
    assert result.returncode == 2, text
    assert "Traceback" not in text, text
    for word in words:
        assert word in text, text


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS))
    return path


@pytest.fixture(scope="module")
def data(tiny_dir, raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "data"
    preprocess(PreprocessOptions(model=tiny_dir, train_file=raw, eval_file=raw, out=out, num_shards=1))
    return out


def train_args(tiny_dir, data, output, *extra):
    return ["train", "--model", tiny_dir, "--data", data, "--output", output, "--pre-seq-len", "4", "--batch-size",
            "4", "--grad-accum", "1", "--logging-steps", "1", "--save-steps", "2", "--max-steps", "4", *extra]


def test_preprocess_never_deletes_a_directory_it_did_not_make(tiny_dir, raw, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    refused(cli("preprocess", "--model", tiny_dir, "--train-file", raw, "--out", out), "--overwrite")
    assert (out / "notes.txt").read_text() == "keep" and (out / "sub").is_dir()
    assert cli("preprocess", "--model", tiny_dir, "--train-file", raw, "--out", out, "--overwrite").returncode == 0
    assert (out / "manifest.json").is_file() and not (out / "notes.txt").exists()


def test_an_interrupted_replacement_keeps_the_old_output_and_stale_partials_go(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed while writing")
    assert (out / "old.txt").read_text() == "old"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{socket.gethostname()}-{dead.pid}-abc"
    stale.mkdir()
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not stale.exists() and (out / "new.txt").is_file() and not (out / "old.txt").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_evaluate_keeps_an_earlier_evaluation_without_overwrite(tiny_dir, data, tmp_path):
    args = ["evaluate", "--model", tiny_dir, "--data", data, "--output", tmp_path / "e", "--max-new-tokens", "2"]
    assert cli(*args).returncode == 0
    before = (tmp_path / "e" / "eval_results.json").read_text()
    refused(cli(*args), "holds an earlier evaluation", "--overwrite")
    assert (tmp_path / "e" / "eval_results.json").read_text() == before
    assert cli(*args, "--overwrite").returncode == 0


def test_one_training_process_per_run_directory(tiny_dir, data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock_path(run).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        refused(cli(*train_args(tiny_dir, data, run)), f"process {holder.pid}", "already being written")
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
    result = cli(*train_args(tiny_dir, data, run))
    assert result.returncode == 0, result.stderr
    assert "taking over the lock" in result.stderr and not lock_path(run).exists()


def test_resume_refuses_files_the_run_did_not_write(tiny_dir, data, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_dir, data, run, "--max-steps", "2")).returncode == 0
    checkpoint = complete_checkpoints(run)[-1]
    assert set(json.loads((checkpoint / COMPLETE).read_text())["sha256"]) >= {"model.safetensors", "optimizer.pt"}
    (checkpoint / "extra.pt").write_bytes(b"not ours")
    refused(cli(*train_args(tiny_dir, data, run, "--resume", "auto")), "extra.pt", "not written by this run")
    (checkpoint / "extra.pt").unlink()
    with open(checkpoint / "optimizer.pt", "ab") as f:
        f.write(b"tampered")
    refused(cli(*train_args(tiny_dir, data, run, "--resume", "auto")), "optimizer.pt", "changed since")


def test_deepspeed_state_without_checksums_is_never_unpickled(tmp_path):
    from glm_portable.errors import UserError
    from glm_portable.training.run_dir import verify_checkpoint

    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    (checkpoint / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"payload")
    (checkpoint / COMPLETE).write_text("")
    with pytest.raises(UserError, match="records no checksums"):
        verify_checkpoint(checkpoint)


def test_rotation_deletes_an_old_checkpoint_only_after_the_new_one_is_complete(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
    mark_complete(tmp_path / "checkpoint-2")
    assert rotate_checkpoints(tmp_path, 1) == []  # checkpoint-4 is not complete: checkpoint-2 stays
    mark_complete(tmp_path / "checkpoint-4")
    assert rotate_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-2"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_a_failed_start_or_an_early_kill_blocks_nothing_and_repeats_no_metric(tiny_dir, data, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_dir, data, run, "--max-steps", "1", "--save-steps", "5")).returncode == 0
    for child in run.glob("checkpoint-*"):
        (child / COMPLETE).unlink()  # as if killed before its first checkpoint completed
    (run / "train_results.json").unlink()
    assert cli(*train_args(tiny_dir, data, run)).returncode == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("args,words", [
    (["--warmup-steps", "-5"], ["--warmup-steps must be at least 0"]),
    (["--lr", "nan"], ["--lr must be a number, got nan"]),
    (["--lora-dropout", "1.5", "--method", "lora"], ["--lora-dropout must be in [0, 1)"]),
    (["--resume", "."], ["not a checkpoint-<step> directory"]),
])
def test_training_mistakes_get_one_message(tiny_dir, data, tmp_path, args, words):
    refused(cli(*train_args(tiny_dir, data, tmp_path / "run", *args)), *words)


def test_outputs_that_are_files_are_refused_by_every_command(tiny_dir, data, raw, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    refused(cli("preprocess", "--model", tiny_dir, "--train-file", raw, "--out", taken), "is a file")
    refused(cli(*train_args(tiny_dir, data, taken)), "is a file")
    refused(cli("evaluate", "--model", tiny_dir, "--data", data, "--output", taken), "is a file")
    refused(cli("make-tiny-model", taken), "is a file")
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("args,words", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
    (["--temperature", "0"], ["--temperature must be positive when sampling"]),
    (["--query", " "], ["--query is empty"]),
])
def test_chat_mistakes_get_one_message(tiny_dir, args, words):
    refused(cli("chat", "--model", tiny_dir, *(["--query", "hi"] if "--query" not in args else []), *args), *words)


@pytest.mark.parametrize("args,words", [
    (["--limit", "0"], ["--limit must be at least 1"]),
    (["--limit", "-1"], ["--limit must be at least 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
])
def test_evaluate_mistakes_get_one_message(tiny_dir, data, tmp_path, args, words):
    refused(cli("evaluate", "--model", tiny_dir, "--data", data, "--output", tmp_path / "e", *args), *words)
    assert not (tmp_path / "e").exists()


def test_bench_mistakes_get_one_message(tmp_path):
    refused(cli("bench", "--shape", "tiny", "--out", tmp_path / "r.json", "--peak-tflops", "-5"),
            "--peak-tflops must be a positive number")
    refused(cli("bench", "--shape", "tiny", "--out", tmp_path), "is a directory")


def test_a_config_field_of_the_wrong_type_is_named(tiny_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_layers": "two"}))
    refused(cli("chat", "--model", model, "--query", "hi"), "config.json: field 'num_layers' is 'two'; expected int")


def test_a_byte_order_mark_is_read_the_same_in_json_lines_and_arrays(tiny_dir, tmp_path):
    from glm_portable.data.reader import read_records

    lines, array = tmp_path / "rows.jsonl", tmp_path / "rows.json"
    lines.write_text("\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS[:2]), encoding="utf-8")
    array.write_text("\ufeff" + json.dumps(ROWS[:2], ensure_ascii=False), encoding="utf-8")
    assert [r.value for r in read_records(lines)] == [r.value for r in read_records(array)] == ROWS[:2]


def test_a_bench_record_with_a_string_for_a_number_is_named(tmp_path):
    assert cli("bench", "--shape", "tiny", "--steps", "2", "--warmup", "0", "--out", tmp_path / "a.json").returncode == 0
    record = json.loads((tmp_path / "a.json").read_text())
    record["results"]["samples_per_s"] = "fast"
    (tmp_path / "b.json").write_text(json.dumps(record))
    refused(cli("compare", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "cmp"),
            "field results.samples_per_s is 'fast'; expected a number")


def test_a_path_under_a_file_is_one_message_for_any_command(tiny_dir, data, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    refused(cli("evaluate", "--model", tiny_dir, "--data", data, "--output", taken / "sub", "--max-new-tokens", "2"),
            "a-file")
    refused(cli("bench", "--shape", "tiny", "--steps", "1", "--warmup", "0", "--out", taken / "r.json"), "a-file")


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_a_checkpoint_of_another_model_is_refused(tiny_dir, tiny2_dir, data, tmp_path, method):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_dir, data, run, "--method", method, "--max-steps", "2")).returncode == 0
    refused(cli("chat", "--model", tiny2_dir, "--checkpoint", run, "--query", "hi"), "trained on another model",
            "num_attention_heads 4 vs 8")
    assert cli("chat", "--model", tiny_dir, "--checkpoint", run, "--query", "hi", "--max-new-tokens", "2").returncode == 0


def test_preprocess_reads_the_model_config_first(tiny_dir, raw, tmp_path):
    import shutil

    model = tmp_path / "v1"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "position_encoding_2d": True}))
    refused(cli("preprocess", "--model", model, "--train-file", raw, "--out", tmp_path / "out"),
            "expected a ChatGLM-6B config")
    assert not (tmp_path / "out").exists()


def test_raw_evaluation_lengths_are_checked(tiny_dir, raw, tmp_path):
    refused(cli("evaluate", "--model", tiny_dir, "--data", raw, "--output", tmp_path / "e", "--max-source-length", "0"),
            "--max-source-length 0 leaves no room")


def test_a_mistake_found_by_the_launched_processes_is_one_message(tiny2_dir, data, tmp_path):
    """The data was preprocessed for another tokenizer; both ranks find it, the launcher says nothing more."""
    from tests.conftest import free_port

    result = cli("train", "--model", tiny2_dir, "--data", data, "--output", tmp_path / "run", "--nproc", "2",
                 "--master-port", free_port(), "--max-steps", "2")
    refused(result, "preprocessed for another model")
    assert "ChildFailedError" not in result.stderr and result.stderr.count("preprocessed for another model") == 1


def test_train_and_make_tiny_model_keep_a_directory_they_did_not_make(tiny_dir, data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(cli(*train_args(tiny_dir, data, mine)), "not a glm-portable run", "--overwrite")
    refused(cli("make-tiny-model", mine), "not empty", "--overwrite")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


class Payload:
    """Not a tensor: weights_only loading refuses to build it."""


def test_a_checkpoint_with_pickled_objects_is_refused_even_with_matching_checksums(tiny_dir, data, tmp_path):
    import torch

    run = tmp_path / "run"
    assert cli(*train_args(tiny_dir, data, run, "--max-steps", "2")).returncode == 0
    checkpoint = complete_checkpoints(run)[-1]
    torch.save({"state": Payload()}, checkpoint / "optimizer.pt")
    mark_complete(checkpoint)  # as if whoever swapped the file rewrote the marker too
    refused(cli(*train_args(tiny_dir, data, run, "--resume", "auto")), "pickled objects that are not plain tensors")


def test_compare_and_preprocess_refuse_what_they_cannot_own(tiny_dir, raw, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    assert cli("bench", "--shape", "tiny", "--steps", "1", "--warmup", "0", "--out", tmp_path / "r.json").returncode == 0
    refused(cli("compare", tmp_path / "r.json", "--out", taken), "is a file")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "data"
        lock_path(out).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        refused(cli("preprocess", "--model", tiny_dir, "--train-file", raw, "--out", out), "already being written")
    finally:
        holder.kill()
        holder.wait()
