"""`glm-portable export`: the exported directory generates what the unexported run generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from glm_portable.backends import get_backend
from glm_portable.evaluation import evaluation_settings, generate_batched, load_for_inference
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.checkpoint import weight_files
from glm_portable.modeling.remote import load_remote
from glm_portable.serving.export import export
from glm_portable.serving.options import ExportOptions

from .conftest import COLORS, ENV

CPU = get_backend("cpu")


def prompts(tokenizer):
    return [tokenizer.encode(f"[Round 1]\n\n问：类型#裙*颜色#{c}\n\n答：") for c in COLORS]


def answers(model, tokenizer):
    return generate_batched(model, tokenizer, prompts(tokenizer), 4, evaluation_settings(max_new_tokens=12))


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_the_exported_directory_generates_like_the_run(remote_base, runs, tmp_path, method):
    tokenizer = load_tokenizer(remote_base)
    expected = answers(load_for_inference(remote_base, runs[method], CPU, "float32"), tokenizer)
    untuned = answers(load_model(remote_base, dtype="float32", device=CPU), tokenizer)
    assert expected != untuned, "training changed nothing, so the comparison would prove nothing"
    out, exported_method = export(ExportOptions(model=remote_base, checkpoint=runs[method], out=tmp_path / "out"))
    assert exported_method == method
    assert answers(load_model(out, device=CPU), tokenizer) == expected
    assert answers(load_remote(out, CPU, "float32").model, tokenizer) == expected

    config = json.loads((out / "config.json").read_text())
    keys = set().union(*(load_file(str(f)).keys() for f in weight_files(out)))
    base_keys = set().union(*(load_file(str(f)).keys() for f in weight_files(remote_base)))
    assert config["use_cache"] is True and config["auto_map"]
    assert not (out / "adapter_config.json").exists()
    if method == "lora":
        assert keys == base_keys and config.get("pre_seq_len") is None
    else:
        assert keys - base_keys == {"transformer.prefix_encoder.embedding.weight"}
        assert config["pre_seq_len"] == 8 and config["prefix_projection"] is False
    for name in ("tokenizer.model", "tokenizer_config.json", "modeling_chatglm.py", "tokenization_chatglm.py"):
        assert (out / name).is_file(), name


def test_export_cli_writes_the_dtype_and_refuses_an_existing_directory(remote_base, runs, tmp_path):
    out = tmp_path / "exported"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "glm_portable.cli", "export", "--model", str(remote_base),
                               "--checkpoint", str(runs["lora"]), "--out", str(out), *extra],
                              capture_output=True, text=True, env=ENV, timeout=300)

    done = run("--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {str(t.dtype) for t in load_file(str(out / "model.safetensors")).values()} == {"torch.bfloat16"}
    (out / "notes.txt").write_text("mine")
    refused = run()
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "notes.txt").read_text() == "mine"
    bad = run("--dtype", "int3")
    assert bad.returncode == 2 and "--dtype 'int3'" in bad.stderr
