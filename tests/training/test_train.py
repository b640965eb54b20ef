"""Training on the tiny model: loss falls, exact resume, 2 processes = 1, checkpoint contents, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm_portable.backends import get_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.errors import TrainingStopped
from glm_portable.modeling import load_model, load_prefix, load_tokenizer
from glm_portable.training.options import TrainOptions
from glm_portable.training.run_dir import read_metrics
from glm_portable.training.trainer import run_training
from tests.conftest import free_port

FAKES = Path(__file__).resolve().parent.parent / "fakes"
COLORS = ["红色", "白色", "黑色", "蓝色", "绿色", "粉色", "灰色", "紫色"]


@pytest.fixture(scope="module")
def data_dir(tiny_dir, tmp_path_factory):
    """Answers follow from the attribute, all rows the same length (so per-rank token means are equal)."""
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。"} for c in COLORS] * 4
    root = tmp_path_factory.mktemp("train-data")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=tiny_dir, train_file=train, out=root / "data", num_shards=2))
    return root / "data"


def _options(tiny_dir, data_dir, output, **kwargs):
    defaults = dict(pre_seq_len=8, lr=2e-2, batch_size=4, grad_accum=1, max_steps=12, logging_steps=1, save_steps=4)
    return TrainOptions(model=tiny_dir, data=data_dir, output=output, **{**defaults, **kwargs})


def _train(options):
    return run_training(options, get_backend("cpu"), "test")


def _cli(*args, env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("GLM_PORTABLE_DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "glm_portable.cli", "train", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _losses(run_dir):
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


@pytest.mark.parametrize("method,lr", [("ptuning", 0.3), ("lora", 5e-3)])
def test_loss_falls_clearly_within_50_steps(tiny_dir, data_dir, tmp_path, method, lr):
    result = _train(_options(tiny_dir, data_dir, tmp_path / method, method=method, lr=lr, max_steps=50, save_steps=50))
    losses = [loss for _, loss in _losses(tmp_path / method)]
    assert len(losses) == 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, (first, last)  # a random tiny model: ~0.6 nats of 6.9 within 50 steps
    results = json.loads((tmp_path / method / "train_results.json").read_text())
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"} <= set(results)
    assert results["train_samples"] == 32
    assert json.loads((tmp_path / method / "all_results.json").read_text()) == results
    assert json.loads((tmp_path / method / "trainer_state.json").read_text())["global_step"] == 50
    assert len(results["peak_memory_bytes_per_rank"]) == 1 and results["peak_memory_bytes_per_rank"][0] > 0
    assert (tmp_path / method / "loss.png").stat().st_size > 0
    run = json.loads((tmp_path / method / "run.json").read_text())
    assert run["backend"]["device"] == "cpu" and run["trainable_parameters"] == sum(
        p.numel() for p in result.model.parameters() if p.requires_grad)


# Seed 42, the tiny chatglm3 model of seed 0, these rows: the losses each method must reproduce exactly
# (the same on the CPU and CUDA builds of torch; a change here is a change of numerics, to be explained).
PINNED = {"ptuning": (0.3, [6.925598, 6.791835, 6.718379, 6.706561]),
          "lora": (5e-3, [6.929718, 6.866854, 6.796437, 6.758947])}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_pinned_losses_for_a_fixed_seed(tiny_dir, data_dir, tmp_path, method):
    lr, pinned = PINNED[method]
    _train(_options(tiny_dir, data_dir, tmp_path / method, method=method, lr=lr, max_steps=4, save_steps=4,
                    lora_dropout=0.0))
    assert [loss for _, loss in _losses(tmp_path / method)] == pytest.approx(pinned, rel=1e-5)


def test_checkpoints_hold_only_what_the_method_trains(tiny_dir, data_dir, tmp_path):
    _train(_options(tiny_dir, data_dir, tmp_path / "p", max_steps=4, save_total_limit=1))
    keys = set(load_file(str(tmp_path / "p" / "checkpoint-4" / "model.safetensors")))
    assert keys == {"transformer.prefix_encoder.embedding.weight"}
    _train(_options(tiny_dir, data_dir, tmp_path / "l", method="lora", lr=1e-3, max_steps=4))
    adapter = load_file(str(tmp_path / "l" / "checkpoint-4" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)


def test_ptuning_checkpoint_on_a_fresh_base_reproduces_the_trained_model(tiny_dir, data_dir, tmp_path):
    trained = _train(_options(tiny_dir, data_dir, tmp_path / "run", max_steps=6, save_steps=3)).model.eval()
    fresh = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=8)
    load_prefix(fresh, tmp_path / "run" / "checkpoint-6")
    tok = load_tokenizer(tiny_dir)
    batch = tok.pad([tok.encode("类型#裙*颜色#红色"), tok.encode("你好")])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, trained(**batch).logits, rtol=0, atol=0)


def test_keep_last_k_checkpoints(tiny_dir, data_dir, tmp_path):
    _train(_options(tiny_dir, data_dir, tmp_path / "run", max_steps=12, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]


def test_killed_run_resumed_with_auto_reproduces_the_uninterrupted_losses(tiny_dir, data_dir, tmp_path):
    args = ["--model", tiny_dir, "--data", data_dir, "--pre-seq-len", "8", "--batch-size", "4", "--grad-accum", "1",
            "--max-steps", "40", "--logging-steps", "1", "--save-steps", "10", "--device", "cpu"]
    reference = _cli(*args, "--output", tmp_path / "full")
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "glm_portable.cli", "train", *map(str, args), "--output", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoint-10" / "COMPLETE").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train_results.json").exists(), "the run finished before it could be killed"
    refused = _cli(*args, "--output", run)
    assert refused.returncode == 2 and "--resume auto" in refused.stderr
    resumed = _cli(*args, "--output", run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run) == _losses(tmp_path / "full")


def test_two_processes_equal_one_at_the_same_global_batch(tiny_dir, tmp_path):
    """LoRA without dropout is deterministic, and equal answers give every rank the same label count, so
    the mean of the per-rank losses is the single-process loss of the same samples."""
    rows = [{"content": f"类型#裙*颜色#{c}*编号#{i}", "summary": "这条裙子简约大方。"} for i, c in enumerate(COLORS * 2)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=tiny_dir, train_file=train, out=tmp_path / "data"))
    common = ["--model", tiny_dir, "--data", tmp_path / "data", "--method", "lora", "--lora-dropout", "0", "--lr", "5e-3",
              "--grad-accum", "1", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "3", "--device", "cpu"]
    one = _cli(*common, "--batch-size", "4", "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _cli(*common, "--batch-size", "2", "--nproc", "2", "--master-port", free_port(), "--output", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert s1 == s2 and abs(l1 - l2) < 1e-5 * abs(l1)


def test_gradient_accumulation_equals_the_larger_batch(tiny_dir, tmp_path):
    """2 micro-batches of 2 accumulate to the same step as one batch of 4 (token-weighted loss)."""
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。" * (1 + i % 3)} for i, c in enumerate(COLORS)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=tiny_dir, train_file=train, out=tmp_path / "data"))
    runs = {}
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        _train(TrainOptions(model=tiny_dir, data=tmp_path / "data", output=tmp_path / name, method="lora", lora_dropout=0.0,
                            lr=5e-3, batch_size=batch, grad_accum=accum, max_steps=3, logging_steps=1, save_steps=3))
        runs[name] = _losses(tmp_path / name)
    for (s1, l1), (s2, l2) in zip(runs["big"], runs["accum"]):
        assert s1 == s2 and abs(l1 - l2) < 1e-5 * l1
    assert 6 < runs["big"][0][1] < 8


def test_refusals_exit_2_with_one_message(tiny_dir, tiny2_dir, data_dir, tmp_path):
    base = ["--data", data_dir, "--max-steps", "2", "--save-steps", "2", "--pre-seq-len", "4", "--device", "cpu"]
    mismatch = _cli("--model", tiny2_dir, *base, "--output", tmp_path / "a")
    assert mismatch.returncode == 2 and "preprocessed for another model" in mismatch.stderr
    assert _cli("--model", tiny_dir, *base, "--output", tmp_path / "b").returncode == 0
    other = _cli("--model", tiny_dir, *base, "--lr", "0.1", "--output", tmp_path / "b")
    assert other.returncode == 2 and "holds a different run (differs in lr)" in other.stderr
    device = _cli("--model", tiny_dir, *base[:-2], "--device", "npu", "--output", tmp_path / "c")
    assert device.returncode == 2 and "torch_npu" in device.stderr
    for result in (mismatch, other, device):
        assert "Traceback" not in result.stderr


def _complete_tensors_are_finite(run_dir):
    from glm_portable.training.run_dir import complete_checkpoints

    kept = complete_checkpoints(run_dir)
    for checkpoint in kept:
        for name, tensor in load_file(str(next(checkpoint.glob("*.safetensors")))).items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name}: {name} is not finite"
    return kept


@pytest.mark.parametrize("method,lr,what", [("ptuning", 1e38, "became non-finite"),
                                            ("ptuning", float("inf"), "became non-finite"),
                                            ("lora", 1e20, "became")])
def test_non_finite_training_stops_and_keeps_only_good_checkpoints(tiny_dir, data_dir, tmp_path, method, lr, what):
    """A step whose loss, gradient norm or updated parameters are not finite ends the run (exit 1 from the
    CLI); no checkpoint with a non-finite tensor is marked complete; metrics.jsonl stays strict JSON."""
    options = _options(tiny_dir, data_dir, tmp_path / "run", method=method, lr=lr, max_steps=12, save_steps=1)
    with pytest.raises(TrainingStopped, match=rf"{what}.* at step \d+; training stopped there. Last good checkpoint"):
        _train(options)
    _complete_tensors_are_finite(tmp_path / "run")
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_the_named_last_good_checkpoint_evaluates(tiny_dir, data_dir, tmp_path):
    """LoRA at lr 1e20: the first update is finite, the next step is not; the checkpoint named is complete,
    finite and evaluates."""
    from glm_portable.evaluation import EvalOptions, evaluate

    options = _options(tiny_dir, data_dir, tmp_path / "run", method="lora", lr=1e20, max_steps=12, save_steps=1)
    with pytest.raises(TrainingStopped) as info:
        _train(options)
    named = Path(str(info.value).split("Last good checkpoint: ")[1])
    assert named in _complete_tensors_are_finite(tmp_path / "run")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps({"content": f"类型#裙*颜色#{c}", "summary": "好"}, ensure_ascii=False)
                             for c in COLORS[:2]))
    results = evaluate(EvalOptions(model=tiny_dir, data=dev, output=tmp_path / "eval", checkpoint=named,
                                   max_new_tokens=4), get_backend("cpu"))
    assert results["samples"] == 2


def test_dry_run_plans_npu_through_the_double_and_cuda(tiny_dir, data_dir, tmp_path):
    args = ["--model", tiny_dir, "--data", data_dir, "--output", tmp_path / "x", "--nproc", "8", "--dry-run"]
    npu = _cli(*args, "--device", "npu", env_extra={"PYTHONPATH": str(FAKES), "FAKE_NPU_DEVICE_COUNT": "8"})
    assert npu.returncode == 0, npu.stderr
    plan = json.loads(npu.stdout)
    assert plan["device"]["dist_backend"] == "hccl"
    assert plan["environment"]["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert plan["environment"]["DS_ACCELERATOR"] == "npu" and plan["environment"]["HCCL_CONNECT_TIMEOUT"]
    assert plan["precision"] == {"dtype": "bfloat16", "loss_scaling": False, "trainable_dtype": "float32"}
    assert plan["data"]["padding"] == "fixed" and plan["processes"]["world_size"] == 8
    assert plan["training"]["trainable_parameters"] == 128 * 2 * 2 * 2 * 16
    assert not (tmp_path / "x").exists()
    cpu = _cli(*args[:-3], "--method", "lora", "--dry-run", "--device", "cpu")
    assert cpu.returncode == 0 and json.loads(cpu.stdout)["training"]["method"] == "lora"


def test_a_finished_run_is_not_trained_again_and_a_larger_max_steps_extends_it(tiny_dir, data_dir, tmp_path):
    common = ["--model", tiny_dir, "--data", data_dir, "--output", tmp_path / "run", "--pre-seq-len", "8",
              "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1", "--save-steps", "3", "--device", "cpu"]
    assert _cli(*common, "--max-steps", "3").returncode == 0
    results = (tmp_path / "run" / "train_results.json").read_text()
    again = _cli(*common, "--max-steps", "3", "--resume", "auto")
    assert again.returncode == 0 and "finished at step 3 already" in again.stderr and "error" not in again.stderr
    assert (tmp_path / "run" / "train_results.json").read_text() == results
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3]
    longer = _cli(*common, "--max-steps", "6", "--resume", "auto")
    assert longer.returncode == 0, longer.stderr
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 6


def test_options_from_yaml_with_config_or_right_after_the_command(tiny_dir, data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_dir}\ndata: {data_dir}\noutput: {tmp_path / 'x'}\nmethod: lora\nmax-steps: 7\n")
    for args in (["--config", config], [config]):
        out = subprocess.run([sys.executable, "-m", "glm_portable.cli", "train", *map(str, args), "--dry-run",
                              "--device", "cpu", "--grad-accum", "2"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["training"]["method"] == "lora" and plan["training"]["max_steps"] == 7
        assert plan["training"]["global_batch"] == 2, "--grad-accum on the command line wins over the file"
    from glm_portable.cli import config_defaults

    config.write_text("lora-target: [query_key_value, dense]\n")
    assert config_defaults(["train", "--config", str(config)]) == {"train": {"lora_target": "query_key_value,dense"}}
    config.write_text("max-stepz: 7\n")
    bad = _cli("--config", config, "--dry-run")
    assert bad.returncode == 2 and "unknown options for train: max_stepz" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "glm_portable.cli", "train", "--help"], capture_output=True,
                            text=True, timeout=300)
    assert "--config run.yaml" in helped.stdout


@pytest.mark.parametrize("method,lr", [("ptuning", 2e-2), ("lora", 1e-4)])
def test_each_method_has_its_recipe_learning_rate(tiny_dir, data_dir, tmp_path, method, lr):
    out = _cli("--model", tiny_dir, "--data", data_dir, "--output", tmp_path / "x", "--method", method, "--dry-run",
               "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["training"]["lr"] == lr


# The same run on a base quantized at load (THUDM's weight-only scheme): its own pinned losses.
PINNED_QUANTIZED = {("ptuning", 4): [6.923272, 6.790452, 6.716082, 6.703933],
                    ("lora", 8): [6.929581, 6.866454, 6.795720, 6.758143]}


@pytest.mark.parametrize("method,bits", sorted(PINNED_QUANTIZED))
def test_quantized_base_trains_the_method_alone_with_pinned_losses(tiny_dir, data_dir, tmp_path, method, bits):
    lr = PINNED[method][0]
    run = tmp_path / f"{method}-{bits}"
    result = _train(_options(tiny_dir, data_dir, run, method=method, lr=lr, max_steps=4, save_steps=4,
                             lora_dropout=0.0, quantization_bit=bits))
    losses = [loss for _, loss in _losses(run)]
    assert losses == pytest.approx(PINNED_QUANTIZED[(method, bits)], rel=1e-5)
    assert losses != pytest.approx(PINNED[method][1], rel=1e-5)  # the quantized base computes differently
    assert json.loads((run / "run.json").read_text())["identity"]["quantization_bit"] == bits
    files = {p.name for p in (run / "checkpoint-4").iterdir()}
    if method == "ptuning":
        assert set(load_file(str(run / "checkpoint-4" / "model.safetensors"))) == {
            "transformer.prefix_encoder.embedding.weight"}
    else:
        assert all("lora_" in k for k in load_file(str(run / "checkpoint-4" / "adapter_model.safetensors")))
    assert not any(name.startswith("model-") for name in files)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(("prefix_encoder" in n) if method == "ptuning" else ("lora_" in n) for n in trainable)


def test_an_adapter_from_a_quantized_base_loads_onto_the_16_bit_base_and_the_reverse(tiny_dir, data_dir, tmp_path):
    from glm_portable.evaluation import load_for_inference

    for bits in (8, None):
        _train(_options(tiny_dir, data_dir, tmp_path / str(bits), method="lora", lr=5e-3, max_steps=4,
                        quantization_bit=bits))
    ids = torch.tensor([load_tokenizer(tiny_dir).encode("类型#裙*颜色#红色")])
    cpu = get_backend("cpu")
    with torch.no_grad():
        base = load_model(tiny_dir, dtype="float32", device="cpu")(input_ids=ids).logits
        for trained, bits in (("8", None), ("None", 8), ("8", 4)):
            model = load_for_inference(tiny_dir, tmp_path / trained, cpu, "float32", quantization_bit=bits)
            assert not torch.equal(model(input_ids=ids).logits, base)


def test_quantization_refusals_exit_2_with_one_message(tiny_dir, data_dir, tmp_path):
    from tests.patches.conftest import make_remote_dir

    common = ("--model", tiny_dir, "--data", data_dir, "--output", tmp_path / "run", "--max-steps", "1")
    bad_bits = _cli(*common, "--quantization-bit", "3")
    assert bad_bits.returncode == 2 and "--quantization-bit 3: expected one of 4, 8" in bad_bits.stderr
    full = _cli(*common, "--method", "full", "--deepspeed", "zero2", "--quantization-bit", "4")
    assert full.returncode == 2 and "quantized weights cannot train" in full.stderr
    remote = make_remote_dir(tiny_dir, tmp_path / "remote")
    own_code = _cli("--model", remote, *common[2:], "--impl", "remote", "--quantization-bit", "4", "--device", "cpu")
    assert own_code.returncode == 2 and "CUDA-only kernels and cannot run on cpu" in own_code.stderr, own_code.stderr
    for result in (bad_bits, full, own_code):
        assert "Traceback" not in result.stderr and not (tmp_path / "run" / "run.json").exists()


def test_the_first_non_finite_step_is_named_exactly_when_it_is_read_only_at_logging_steps(tiny_dir, data_dir,
                                                                                           tmp_path):
    """The loss is watched on the device and read at logging / saving steps: the step named is still the first
    bad one, whichever step the run learns of it at, and nothing after it is saved."""
    stops = {}
    for every in (1, 5):
        options = _options(tiny_dir, data_dir, tmp_path / str(every), method="lora", lr=1e20, max_steps=12,
                           save_steps=every, logging_steps=every)
        with pytest.raises(TrainingStopped) as info:
            _train(options)
        stops[every] = str(info.value).split(";")[0]
        _complete_tensors_are_finite(tmp_path / str(every))
    assert stops[1] == stops[5] and "at step" in stops[5]
    assert not any((tmp_path / "5").glob("checkpoint-*"))


def test_compiled_training_gives_the_eager_losses(tiny_dir, data_dir, tmp_path):
    losses = {}
    for compiled in (False, True):
        _train(_options(tiny_dir, data_dir, tmp_path / str(compiled), method="lora", lr=5e-3, lora_dropout=0.0,
                        max_steps=3, save_steps=3, compile=compiled))
        losses[compiled] = [loss for _, loss in _losses(tmp_path / str(compiled))]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_is_refused_where_the_backend_offers_none(tiny_dir, data_dir, tmp_path, fake_npu):
    from glm_portable.errors import UserError
    from glm_portable.training.trainer import training_arguments

    options = _options(tiny_dir, data_dir, tmp_path / "run", compile=True)
    with pytest.raises(UserError, match="--compile: torch.compile is not offered on npu"):
        training_arguments(options, get_backend("npu"), torch.bfloat16, 1)
