import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from glm_portable.data import (PreprocessOptions, TrainCollator, check_compatible, load_preprocessed,
                               preprocess, read_manifest)
from glm_portable.errors import UserError
from glm_portable.modeling import load_tokenizer


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


GOOD = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。"} for c in ("红色", "白色", "黑色")] * 4


def _options(tiny_dir, tmp_path, **kwargs):
    train = kwargs.pop("train", None) or _write(tmp_path / "train.jsonl", GOOD)
    return PreprocessOptions(model=tiny_dir, train_file=train, out=tmp_path / "out", **kwargs)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "glm_portable.cli", "preprocess", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_manifest_describes_sources_tokenizer_limits_and_counts(tiny2_dir, tmp_path):
    rows = GOOD + [{"content": "", "summary": "x"}, {"content": "长" * 200, "summary": "短"}]
    train = _write(tmp_path / "train.jsonl", rows)
    result = preprocess(_options(tiny2_dir, tmp_path, train=train, eval_file=train, num_shards=4))
    manifest = read_manifest(tmp_path / "out")
    assert manifest == result.manifest and not result.reused
    assert manifest["format"] == "adgen" and manifest["template"] == "chatglm2-rounds"
    assert manifest["sources"][0]["rows"] == 14 and len(manifest["sources"][0]["sha256"]) == 64
    assert manifest["tokenizer"]["fingerprint"] == load_tokenizer(tiny2_dir).fingerprint()
    assert manifest["limits"] == {"max_source_length": 64, "max_target_length": 128, "fixed_length": 193}
    train_split = manifest["splits"]["train"]
    assert (train_split["rows"], train_split["skipped_empty"], train_split["source_truncated"]) == (13, 1, 1)
    assert train_split["num_shards"] == 4 and train_split["tokens"]["max"] <= 193
    dataset = load_preprocessed(tmp_path / "out")
    assert len(dataset) == 13 and len(list((tmp_path / "out" / "train").glob("data-*.arrow"))) == 4
    assert load_preprocessed(tmp_path / "out", "eval")[0]["reference"] == GOOD[0]["summary"]


def test_rerun_reuses_and_other_options_are_refused(tiny_dir, tmp_path):
    preprocess(_options(tiny_dir, tmp_path))
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert preprocess(_options(tiny_dir, tmp_path)).reused
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other inputs or options"):
        preprocess(_options(tiny_dir, tmp_path, max_source_length=32))
    assert not preprocess(_options(tiny_dir, tmp_path, max_source_length=32, overwrite=True)).reused


def test_shards_for_another_tokenizer_or_template_are_refused(tiny_dir, tiny2_dir, tmp_path):
    preprocess(_options(tiny_dir, tmp_path))
    check_compatible(tmp_path / "out", load_tokenizer(tiny_dir), "chatglm3-roles")
    with pytest.raises(UserError, match="preprocessed for another model.*tokenizer"):
        check_compatible(tmp_path / "out", load_tokenizer(tiny2_dir), "chatglm2-rounds")


def test_each_format_preprocesses(tiny_dir, tmp_path):
    files = {
        "prompt-completion": [{"prompt": "p", "completion": "c"}],
        "context-target": [{"context": "p", "target": "c"}],
        "alpaca": [{"instruction": "i", "input": "x", "output": "o"}],
        "conversations": [{"conversations": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}],
    }
    for fmt, rows in files.items():
        result = preprocess(PreprocessOptions(model=tiny_dir, train_file=_write(tmp_path / f"{fmt}.jsonl", rows),
                                              out=tmp_path / fmt))
        assert result.manifest["format"] == fmt and result.manifest["splits"]["train"]["rows"] == 1


def test_malformed_line_exits_2_with_file_and_line(tiny_dir, tmp_path):
    train = _write(tmp_path / "train.jsonl", GOOD[:2] + ['{"content": "x", "summary": '])
    result = _run_cli("--model", tiny_dir, "--train-file", train, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"{train}:3: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_skip_bad_rows_counts_and_lists_them(tiny_dir, tmp_path):
    rows = GOOD[:2] + ['{"content": "x", "summary": ', {"content": "c", "summary": 5}]
    train = _write(tmp_path / "train.jsonl", rows)
    manifest = preprocess(_options(tiny_dir, tmp_path, train=train, skip_bad_rows=True)).manifest
    split = manifest["splits"]["train"]
    assert split["rows"] == 2 and split["bad_rows"] == 2
    assert split["bad_row_list"][1] == f"{train}:4: field 'summary' must be a string, got int"


def test_missing_columns_list_what_was_found(tiny_dir, tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"text": "a", "label": "b"}])
    result = _run_cli("--model", tiny_dir, "--train-file", train, "--out", tmp_path / "out")
    assert result.returncode == 2 and "columns found (label, text)" in result.stderr
    with pytest.raises(UserError, match=r"train.jsonl:1: missing field 'content' \(fields found: label, text\)"):
        preprocess(_options(tiny_dir, tmp_path, train=train, format="adgen"))


def test_empty_input_and_no_usable_rows(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="the file is empty"):
        preprocess(_options(tiny_dir, tmp_path, train=_write(tmp_path / "e.jsonl", [""])))
    with pytest.raises(UserError, match="no usable rows"):
        preprocess(_options(tiny_dir, tmp_path, train=_write(tmp_path / "z.jsonl", [{"content": "", "summary": ""}])))


def test_a_killed_run_leaves_nothing_that_looks_complete(tiny_dir, tmp_path):
    rows = [{"content": f"类型#裙*编号#{i}", "summary": "这条裙子简约大方，适合日常穿着。" * 8} for i in range(120_000)]
    train = _write(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "glm_portable.cli", "preprocess", "--model", str(tiny_dir),
                             "--train-file", str(train), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.partial-*")), "the run should have reached the writing stage"
    assert not out.exists()


def test_an_error_while_writing_removes_the_partial_directory(tiny_dir, tmp_path, monkeypatch):
    import glm_portable.data.preprocessing as module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_save_split", fail)
    with pytest.raises(OSError):
        preprocess(_options(tiny_dir, tmp_path))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_collator_pads_right_fixed_or_dynamic():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    fixed = TrainCollator(pad_token_id=0, padding="fixed", fixed_length=5)(rows)
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert fixed["labels"].tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100]]
    dynamic = TrainCollator(pad_token_id=0, padding="dynamic")(rows)
    assert dynamic["input_ids"].shape == torch.Size([2, 3])
