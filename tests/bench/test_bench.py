"""bench records and compare reports: valid records, FLOPs against a hand count, verdicts, refusals."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm_portable.backends import get_backend
from glm_portable.bench.compare import compare
from glm_portable.bench.flops import matmul_parameters, training_flops_per_token
from glm_portable.bench.record import read_record
from glm_portable.bench.options import Workload
from glm_portable.schema import validate
from glm_portable.bench.workload import synthetic_rows
from glm_portable.errors import UserError
from glm_portable.modeling import ChatGLM1Config, ChatGLMConfig
from glm_portable.training.methods import METHODS
from tests.conftest import free_port

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["--shape", "tiny", "--steps", "4", "--warmup", "1", "--batch-size", "2", "--source-length", "16",
         "--target-length", "16", "--pre-seq-len", "4"]


def cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "glm_portable.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "GLM_PORTABLE_DEVICE": "cpu"})
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two runs of one workload with the same seed, and one with MFU from an explicit peak."""
    root = tmp_path_factory.mktemp("bench")
    cli("bench", *QUICK, "--out", root / "a.json", "--name", "first")
    cli("bench", *QUICK, "--out", root / "b.json", "--name", "second", "--peak-tflops", "2.5")
    return root


def test_record_holds_the_documented_fields(records):
    record = read_record(records / "a.json")
    res = record["results"]
    assert record["device"] == {"backend": "cpu", "name": record["device"]["name"], "count": 1,
                                "kernels": get_backend("cpu").kernels().name}
    assert record["dtype"] == "float32" and record["versions"]["torch"] and record["code"]
    assert record["workload"]["shape"] == "tiny" and record["workload"]["pre_seq_len"] == 4
    assert len(res["losses"]) == 5 and all(isinstance(v, float) for v in res["losses"])
    assert res["measured_steps"] == 4
    assert res["samples_per_s"] == pytest.approx(res["tokens_per_s"] / 32, rel=1e-3)
    assert res["step_time_s"]["p50"] <= res["step_time_s"]["p90"]
    assert res["samples_per_s"] == pytest.approx(2 / res["step_time_s"]["mean"], rel=1e-2)
    assert res["mfu"] is None and res["peak_memory_bytes"][0] > 0


def test_mfu_is_model_flops_over_the_given_peak(records):
    res = read_record(records / "b.json")["results"]
    assert res["peak_tflops"] == 2.5
    assert res["mfu"] == pytest.approx(res["flops_per_token"] * res["tokens_per_s_per_device"] / 2.5e12, rel=1e-4)


def test_same_seed_gives_the_same_losses_and_a_passing_verdict(records, tmp_path):
    summary = compare([records / "a.json", records / "b.json"], tmp_path / "report")
    (alignment,) = summary["alignment"]
    assert alignment["passed"] and alignment["max_relative_error"] < 1e-6
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| NAME | SamplesPerSec | Iterations | DataType | Torch_Version | Card |" in report
    assert "| second |" in report and "PASS" in report
    for plot in ("throughput.png", "loss.png", "loss_error.png"):
        assert (tmp_path / "report" / plot).read_bytes().startswith(PNG)


def test_a_perturbed_run_fails_the_verdict(records, tmp_path):
    record = json.loads((records / "b.json").read_text())
    record["name"] = "perturbed"
    record["results"]["losses"] = [v * (1.06 if i % 2 else 1.0) for i, v in enumerate(record["results"]["losses"])]
    (tmp_path / "p.json").write_text(json.dumps(record))
    out = cli("compare", records / "a.json", tmp_path / "p.json", "--out", tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "compare.json").read_text())
    (alignment,) = summary["alignment"]
    assert not alignment["passed"]
    assert alignment["mean_relative_error"] == pytest.approx(0.06 * 2 / 5, rel=1e-6)
    assert alignment["max_relative_error"] == pytest.approx(0.06, rel=1e-6)
    assert "FAIL" in out.stdout and "does not align" in out.stderr


def test_different_workloads_are_refused_unless_forced(records, tmp_path):
    cli("bench", *QUICK, "--out", tmp_path / "c.json", "--name", "bigger", "--seed", "7", "--batch-size", "3")
    refused = cli("compare", records / "a.json", tmp_path / "c.json", "--out", tmp_path / "r", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "batch_size, seed" in refused.stderr and not (tmp_path / "r").exists()
    cli("compare", records / "a.json", tmp_path / "c.json", "--out", tmp_path / "r", "--force")
    assert "Compared with --force" in (tmp_path / "r" / "report.md").read_text()


def test_a_quantized_base_is_part_of_the_workload(records, tmp_path):
    cli("bench", *QUICK, "--out", tmp_path / "q.json", "--quantization-bit", "4")
    record = read_record(tmp_path / "q.json")
    assert record["workload"]["quantization_bit"] == 4
    assert read_record(records / "a.json")["workload"]["quantization_bit"] is None
    losses = record["results"]["losses"]
    assert losses != read_record(records / "a.json")["results"]["losses"] and all(l > 0 for l in losses)
    refused = cli("compare", records / "a.json", tmp_path / "q.json", "--out", tmp_path / "r", check=False)
    assert refused.returncode == 2 and "quantization_bit" in refused.stderr


def test_varied_rows_count_their_real_tokens_and_packing_removes_the_padding(tmp_path):
    base = [*QUICK, "--varied-lengths"]
    cli("bench", *base, "--out", tmp_path / "fixed.json", "--name", "fixed")
    fixed = read_record(tmp_path / "fixed.json")
    cli("bench", *base, "--packing", "--pack-length", "128", "--out", tmp_path / "packed.json", "--name", "packed")
    packed = read_record(tmp_path / "packed.json")
    assert fixed["workload"]["varied_lengths"] and packed["workload"]["packing"]
    assert 0.2 < fixed["results"]["padding_fraction"] < 0.5  # rows of 12..32 tokens in 32-token batches
    assert packed["results"]["padding_fraction"] < 0.1
    # a step of packed sequences carries more rows than the batch size
    batch = packed["workload"]["batch_size"]
    assert packed["results"]["samples_per_s"] * packed["results"]["step_time_s"]["mean"] > 1.5 * batch
    assert fixed["results"]["samples_per_s"] * fixed["results"]["step_time_s"]["mean"] == pytest.approx(batch, rel=1e-4)
    refused = cli("compare", tmp_path / "fixed.json", tmp_path / "packed.json", "--out", tmp_path / "r", check=False)
    assert refused.returncode == 2 and "packing" in refused.stderr


def test_synthetic_varied_rows_keep_the_prompt_end_and_stay_within_the_lengths():
    workload = Workload(shape="tiny", source_length=16, target_length=32, varied_lengths=True, steps=4, warmup=0)
    rows = synthetic_rows(workload, ChatGLM1Config(vocab_size=1000, num_layers=1, hidden_size=64,
                                                   num_attention_heads=4, inner_hidden_size=128))
    lengths = [len(r) for r in rows["input_ids"]]
    assert min(lengths) >= 8 + 8 and max(lengths) <= 48 and len(set(lengths)) > 3
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        prompt = labels.count(-100)
        assert 8 <= prompt <= 16 and ids[prompt - 2:prompt] == [130001, 130004]  # [gMASK] <sop> end the prompt


def test_compare_thudm_runs_the_directorys_own_code_on_the_same_rows(tmp_path, tiny_dir):
    from tests.patches.conftest import make_remote_dir

    remote = make_remote_dir(tiny_dir, tmp_path / "remote")
    cli("bench", "--shape", remote, *QUICK[2:], "--varied-lengths", "--padding", "dynamic", "--compare-thudm",
              "--out", tmp_path / "c.json")
    record = read_record(tmp_path / "c.json")
    thudm = record["thudm_style"]
    assert thudm["workload"]["impl"] == "remote" and thudm["workload"]["padding"] == "fixed"
    assert record["workload"]["impl"] == "native" and record["workload"]["padding"] == "dynamic"
    assert thudm["results"]["padding_fraction"] > record["results"]["padding_fraction"]
    ratio = record["results"]["ratio_to_thudm_style"]["samples_per_s"]
    assert ratio == pytest.approx(record["results"]["samples_per_s"] / thudm["results"]["samples_per_s"], rel=1e-2)
    no_code = cli("bench", *QUICK, "--compare-thudm", "--out", tmp_path / "d.json", check=False)
    assert no_code.returncode == 2 and "--compare-thudm: give a model directory" in no_code.stderr


def test_a_file_that_is_no_record_is_named_with_its_missing_field(records, tmp_path):
    record = json.loads((records / "a.json").read_text())
    del record["results"]["losses"]
    (tmp_path / "bad.json").write_text(json.dumps(record))
    out = cli("compare", records / "a.json", tmp_path / "bad.json", "--out", tmp_path / "r", check=False)
    assert out.returncode == 2 and "bad.json: field results.losses is missing" in out.stderr


def test_bench_refuses_to_overwrite_and_misstated_dtypes(records):
    out = cli("bench", *QUICK, "--out", records / "a.json", check=False)
    assert out.returncode == 2 and "use --overwrite" in out.stderr
    out = cli("bench", *QUICK, "--method", "full", "--dtype", "bfloat16", "--out", records / "x.json", check=False)
    assert out.returncode == 2 and "DeepSpeed trains in float32" in out.stderr


def test_two_processes_record_both_devices(tmp_path):
    cli("bench", *QUICK, "--method", "lora", "--nproc", "2", "--master-port", free_port(), "--out", tmp_path / "d.json")
    record = read_record(tmp_path / "d.json")
    assert record["device"]["count"] == 2 and record["workload"]["world_size"] == 2
    assert len(record["results"]["peak_memory_bytes"]) == 2
    assert record["results"]["samples_per_s"] == pytest.approx(4 / record["results"]["step_time_s"]["mean"], rel=1e-2)


def test_flops_match_a_hand_count_of_chatglm2_6b():
    h, ffn, layers, vocab, kv = 4096, 13696, 28, 65024, 2 * 2 * 128
    per_layer = h * (h + kv) + h * h + h * 2 * ffn + ffn * h
    assert matmul_parameters(ChatGLMConfig()) == layers * per_layer + h * vocab
    n = layers * per_layer + h * vocab
    attention = 12 * layers * 32 * 128 * (192 + 128)
    ptuning, full, lora = (METHODS[name] for name in ("ptuning", "full", "lora"))
    assert training_flops_per_token(ChatGLMConfig(), ptuning, 192, 128, 99) == 4 * n + attention
    assert training_flops_per_token(ChatGLMConfig(), full, 192) == 6 * n + 12 * layers * 32 * 128 * 192
    assert training_flops_per_token(ChatGLMConfig(), lora, 192, 0, 1000) == 4 * n + 6000 + 12 * layers * 32 * 128 * 192


def test_synthetic_rows_are_seeded_and_learnable():
    workload = Workload(shape="tiny", steps=2, warmup=0, batch_size=3, source_length=5, target_length=7)
    rows = synthetic_rows(workload, ChatGLMConfig(padded_vocab_size=100))
    assert rows == synthetic_rows(copy.deepcopy(workload), ChatGLMConfig(padded_vocab_size=100))
    assert len(rows["input_ids"]) == 6 and all(len(r) == 12 for r in rows["input_ids"])
    first = rows["input_ids"][0]
    assert first[5:] == first[:5] + first[:2] and rows["labels"][0][:5] == [-100] * 5
    assert min(min(r) for r in rows["input_ids"]) >= 3 and max(max(r) for r in rows["input_ids"]) < 100
    other = synthetic_rows(Workload(shape="tiny", steps=2, warmup=0, batch_size=3, source_length=5, target_length=7,
                                    seed=1), ChatGLMConfig(padded_vocab_size=100))
    assert other != rows
    v1 = synthetic_rows(workload, ChatGLM1Config(vocab_size=100, gmask_token_id=1, bos_token_id=2))
    assert all(r[3:5] == [1, 2] for r in v1["input_ids"]) and [r[5:] for r in v1["input_ids"]] == \
        [r[5:] for r in rows["input_ids"]]  # ChatGLM-6B prompts end with [gMASK] <sop>; the answers stay


def test_workload_validation_names_the_flag():
    with pytest.raises(UserError, match="--steps must be at least 1"):
        validate(Workload(shape="tiny", steps=0))
    with pytest.raises(UserError, match="--shape nowhere"):
        validate(Workload(shape="nowhere"))
    with pytest.raises(UserError, match="--method 'sft': expected one of ptuning, lora, full"):
        validate(Workload(shape="tiny", method="sft"))


def test_a_model_directory_is_benched_with_its_own_weights(tiny_dir, tmp_path):
    cli("bench", *QUICK[2:], "--shape", tiny_dir, "--out", tmp_path / "dir.json")
    record = read_record(tmp_path / "dir.json")
    assert record["workload"]["shape"] == f"dir:{Path(tiny_dir).name}"
    assert record["workload"]["architecture"]["num_layers"] == 2
