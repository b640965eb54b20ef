import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from glm_portable.modeling.checkpoint import weight_files
from glm_portable.modeling.config import UPSTREAM_DEFAULTS, load_config


def test_cli_builds_an_upstream_layout_directory(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "glm_portable.cli", "make-tiny-model", str(out), "--family", "chatglm2",
         "--layers", "3", "--shards", "2", "--seed", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert set(UPSTREAM_DEFAULTS) <= set(config)
    assert config["num_layers"] == 3 and config["seq_length"] == 32768
    assert json.loads((out / "tokenizer_config.json").read_text())["glm_portable_family"] == "chatglm2"
    files = weight_files(out)
    assert len(files) == 2 and (out / "model.safetensors.index.json").is_file()
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    expected = {"transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq",
                "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"}
    per_layer = ["input_layernorm.weight", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
                 "self_attention.dense.weight", "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight",
                 "mlp.dense_4h_to_h.weight"]
    expected |= {f"transformer.encoder.layers.{n}.{k}" for n in range(3) for k in per_layer}
    assert set(state) == expected
    h, kv = config["hidden_size"], config["kv_channels"]
    qkv = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * kv
    assert state["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape == (qkv, h)
    assert state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * config["ffn_hidden_size"], h)
    assert state["transformer.rotary_pos_emb.inv_freq"].shape == (kv // 4,)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from glm_portable.modeling.tiny import make_tiny_model

    a = load_file(str(make_tiny_model(tmp_path / "a", seed=1) / "model.safetensors"))
    b = load_file(str(make_tiny_model(tmp_path / "b", seed=1) / "model.safetensors"))
    c = load_file(str(make_tiny_model(tmp_path / "c", seed=2) / "model.safetensors"))
    key = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_config_tolerates_unknown_fields_and_rope_ratio(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(rope_ratio=50, some_future_field={"x": 1})
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_config(tmp_path)
    assert loaded.rope_ratio == 50
    assert loaded.upstream_dict()["some_future_field"] == {"x": 1}


def test_bad_arguments_exit_2_with_one_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "glm_portable.cli", "make-tiny-model", str(tmp_path / "x"), "--heads", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "divisible" in result.stderr and "Traceback" not in result.stderr
