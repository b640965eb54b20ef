"""Library patches, the patches table, and --impl remote end to end against the native implementation."""

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import Trainer, TrainingArguments

from glm_portable.backends import get_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.errors import UserError
from glm_portable.modeling import load_model
from glm_portable.modeling.remote import load_remote
from glm_portable.patches import Context, patch_table
from glm_portable.patches.library_fixes import (DEEPSPEED_VERSION_CHECK, TRAINER_TOKENIZER,
                                                TRAINING_ARGS_NPU, TRANSFORMERS_DEEPSPEED_MODULE)
from tests.conftest import free_port

CPU = Context.current("cpu")
ENV = {**os.environ, "GLM_PORTABLE_DEVICE": "cpu"}


def cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "glm_portable.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=600, env=ENV)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_transformers_deepspeed_module_is_restored_and_removed_again():
    TRANSFORMERS_DEEPSPEED_MODULE.revert()  # an earlier in-process run may have applied it
    sys.modules.pop("transformers.deepspeed", None)
    assert TRANSFORMERS_DEEPSPEED_MODULE.needed(CPU, None).needed
    with pytest.raises(ImportError):
        importlib.import_module("transformers.deepspeed")
    assert TRANSFORMERS_DEEPSPEED_MODULE.apply(CPU)
    assert not TRANSFORMERS_DEEPSPEED_MODULE.apply(CPU)
    assert hasattr(importlib.import_module("transformers.deepspeed"), "HfDeepSpeedConfig")
    TRANSFORMERS_DEEPSPEED_MODULE.revert()
    sys.modules.pop("transformers.deepspeed", None)
    with pytest.raises(ImportError):
        importlib.import_module("transformers.deepspeed")


def test_trainer_takes_tokenizer_again(tmp_path):
    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    TRAINER_TOKENIZER.revert()  # an earlier in-process run may have applied it
    original = vars(Trainer)["__init__"]
    with pytest.raises(TypeError, match="tokenizer"):
        Trainer(model=model, args=args, tokenizer="tok")
    TRAINER_TOKENIZER.apply(CPU)
    assert Trainer(model=model, args=args, tokenizer="tok").tokenizer == "tok"
    assert TRAINER_TOKENIZER.needed(CPU, None).needed, "the decision must look at the unpatched library"
    TRAINER_TOKENIZER.revert()
    assert vars(Trainer)["__init__"] is original and "tokenizer" not in vars(Trainer)


def test_old_library_patches_are_gated_and_refuse_with_the_upgrade():
    npu = Context.current("npu")
    assert not TRAINING_ARGS_NPU.needed(npu, None).needed
    assert not DEEPSPEED_VERSION_CHECK.needed(npu, None).needed
    old = replace(npu, versions={**npu.versions, "transformers": "4.31.0", "deepspeed": "0.9.2"})
    assert TRAINING_ARGS_NPU.needed(old, None).needed and DEEPSPEED_VERSION_CHECK.needed(old, None).needed
    assert not TRAINING_ARGS_NPU.needed(replace(old, backend="cuda"), None).needed
    with pytest.raises(UserError, match=r"transformers>=4\.40"):
        TRAINING_ARGS_NPU.apply(old)


def test_remote_logits_equal_native_with_padding_and_prefix(remote_dir):
    cpu = get_backend("cpu")
    remote = load_remote(remote_dir, cpu, "float32", pre_seq_len=4)
    native = load_model(remote_dir, dtype="float32", device=cpu, pre_seq_len=4)
    native.transformer.prefix_encoder.load_state_dict(remote.model.transformer.prefix_encoder.state_dict())
    ids = torch.tensor([[0, 0, 1001, 1003, 5, 6, 7], [1001, 1003, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = remote.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        want = native(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    assert any(name.startswith("generation-tuple-cache") for name in remote.patches)
    plain = load_remote(remote_dir, cpu, "float32")
    base = load_model(remote_dir, dtype="float32", device=cpu)
    prompt = remote.tokenizer.build_chat_input("你好")
    with torch.no_grad():
        torch.testing.assert_close(plain.model(input_ids=prompt["input_ids"]).logits, base(prompt["input_ids"]).logits,
                                   rtol=1e-5, atol=1e-5)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(remote.model.generate(**prompt, **greedy), native.generate(prompt["input_ids"], **greedy))


def test_patches_table_for_a_model_directory(remote_dir):
    rows = {r["name"]: r for r in
            json.loads(cli("patches", "--model", remote_dir, "--impl", "remote", "--json").stdout)["patches"]}
    for name in ("tokenizer-init-order", "config-generation-fields", "model-post-init", "generation-tuple-cache",
                 "transformers-deepspeed-module"):
        assert rows[name]["needed"] and rows[name]["applied"], name
    assert rows["npu-attention-kernel"]["needed"] is False and "cpu" in rows["npu-attention-kernel"]["why"]
    assert rows["quantization-cuda-only"]["needed"] and "refused" in rows["quantization-cuda-only"]["why"]
    assert rows["training-args-npu"]["needed"] is False
    assert all(r["needed"] is None for r in patch_table(CPU) if r["kind"] == "remote")


def test_a_directory_s_code_runs_only_with_impl_remote(remote_dir, tmp_path):
    """Its modules write a marker when imported: `patches --model` reads them as text, `--impl remote` runs them."""
    import shutil

    model = tmp_path / "marked"
    shutil.copytree(remote_dir, model)
    marker = tmp_path / "code-ran"
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        with open(model / name, "a", encoding="utf-8") as f:
            f.write(f"\nopen({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    table = json.loads(cli("patches", "--model", model, "--json").stdout)
    assert not marker.exists()
    assert "was read, not run" in table["note"]
    remote_rows = [r for r in table["patches"] if r["kind"] == "remote"]
    assert remote_rows and all(r["needed"] is None and "--impl remote" in r["why"] for r in remote_rows)
    cli("patches", "--model", model, "--impl", "remote", "--json")
    assert "modeling_chatglm.py" in marker.read_text()


def test_remote_impl_trains_evaluates_and_chats_like_native(remote_dir, tmp_path):
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。"} for c in ("红色", "白色", "黑色", "蓝色")] * 4
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=remote_dir, train_file=train, eval_file=train, out=tmp_path / "data", num_shards=1))
    cli("train", "--model", remote_dir, "--data", tmp_path / "data", "--output", tmp_path / "run", "--impl", "remote",
        "--pre-seq-len", "4", "--lr", "0.3", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "12",
        "--logging-steps", "1", "--save-steps", "12")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["impl"] == "remote" and "prefix-tokens-on-meta (modeling_chatglm.py)" in run["patches"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses  # only the prefix trains, as natively
    for impl in ("remote", "native"):
        cli("evaluate", "--model", remote_dir, "--checkpoint", tmp_path / "run", "--data", tmp_path / "data",
            "--output", tmp_path / f"eval-{impl}", "--impl", impl, "--max-new-tokens", "8")
    predictions = [(tmp_path / f"eval-{impl}" / "generated_predictions.txt").read_text() for impl in ("remote", "native")]
    assert predictions[0] == predictions[1]
    answers = [cli("chat", "--model", remote_dir, "--checkpoint", tmp_path / "run", "--impl", impl, "--query", "类型#裙*颜色#红色",
                   "--greedy", "--max-new-tokens", "8").stdout for impl in ("remote", "native")]
    assert answers[0] == answers[1] and answers[0].strip()


def test_remote_impl_refuses_a_directory_without_its_own_code(tiny_dir):
    out = cli("chat", "--model", tiny_dir, "--impl", "remote", "--query", "你好", check=False)
    assert out.returncode == 2 and "auto_map has no AutoModel entry" in out.stderr and "Traceback" not in out.stderr
    out = cli("chat", "--model", tiny_dir, "--impl", "borrowed", "--query", "你好", check=False)
    assert out.returncode == 2 and "--impl 'borrowed'" in out.stderr


def test_a_remote_full_checkpoint_is_a_model_directory_that_generates_like_native(remote_dir, tmp_path):
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子。"} for c in ("红色", "白色", "黑色", "蓝色")]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=remote_dir, train_file=train, eval_file=train, out=tmp_path / "data", num_shards=1))
    cli("train", "--model", remote_dir, "--data", tmp_path / "data", "--output", tmp_path / "run", "--impl", "remote",
        "--method", "full", "--deepspeed", "zero2", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "1",
        "--max-steps", "4", "--save-steps", "4", "--master-port", free_port())
    checkpoint = tmp_path / "run" / "checkpoint-4"
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py", "tokenizer.model", "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "config.json").read_text())["use_cache"] is True
    for impl in ("remote", "native"):
        cli("evaluate", "--model", remote_dir, "--checkpoint", checkpoint, "--data", tmp_path / "data",
            "--output", tmp_path / f"eval-{impl}", "--impl", impl, "--max-new-tokens", "6")
    predictions = [(tmp_path / f"eval-{impl}" / "generated_predictions.txt").read_text() for impl in ("remote", "native")]
    assert predictions[0] == predictions[1]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_remote_ptuning_trains_only_the_prefix_exactly_as_native(remote_dir, tmp_path, grad_accum):
    """Same seed and data: the same trainable parameters, the same loss at every step, the same prefix.
    Rows of different lengths, so that weighting micro-batches by tokens and equally would differ."""
    from safetensors.torch import load_file

    from glm_portable.training.options import TrainOptions
    from glm_portable.training.run_dir import read_metrics
    from glm_portable.training.trainer import run_training

    rows = [{"content": f"类型#裙*颜色#{c}", "summary": "这条裙子" + "简约大方" * n} for n, c in
            enumerate(("红色", "白色", "黑色", "蓝色", "绿色", "紫色", "灰色", "粉色"), 1)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=remote_dir, train_file=train, out=tmp_path / "data", num_shards=1))
    runs = {}
    for impl in ("native", "remote"):
        options = TrainOptions(model=remote_dir, data=tmp_path / "data", output=tmp_path / impl, impl=impl,
                               pre_seq_len=4, lr=0.05, batch_size=2, grad_accum=grad_accum, max_steps=6,
                               logging_steps=1, save_steps=6)
        run_training(options, get_backend("cpu"), "test")
        runs[impl] = tmp_path / impl
    recorded = {impl: json.loads((run / "run.json").read_text())["trainable_parameters"] for impl, run in runs.items()}
    assert recorded["remote"] == recorded["native"] == 4 * 2 * 2 * 2 * 16
    losses = {impl: [m["loss"] for m in read_metrics(run)] for impl, run in runs.items()}
    assert len(losses["native"]) == 6
    assert losses["remote"] == pytest.approx(losses["native"], rel=1e-5)
    prefixes = [load_file(str(run / "checkpoint-6" / "model.safetensors")) for run in runs.values()]
    assert set(prefixes[0]) == set(prefixes[1]) == {"transformer.prefix_encoder.embedding.weight"}
    torch.testing.assert_close(prefixes[0]["transformer.prefix_encoder.embedding.weight"],
                               prefixes[1]["transformer.prefix_encoder.embedding.weight"], rtol=1e-4, atol=1e-5)
