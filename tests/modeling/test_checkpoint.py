import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from glm_portable.errors import UserError
from glm_portable.modeling import load_model, load_prefix, load_tokenizer, save_model, save_prefix


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_load_equals_unsharded(tiny2_dir, tmp_path):
    sharded = load_model(tiny2_dir, dtype="float32", device="cpu")
    assert (tiny2_dir / "model.safetensors.index.json").is_file()
    single = save_model(sharded, tmp_path / "single", tokenizer=load_tokenizer(tiny2_dir))
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    assert _same_state(sharded, load_model(single, dtype="float32", device="cpu"))


def test_save_load_round_trip_is_bit_exact_in_bf16(tiny_dir, tmp_path):
    model = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    out = save_model(model, tmp_path / "bf16", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _same_state(model, load_model(out, dtype="bfloat16", device="cpu"))


def test_upstream_bin_shards_with_index_load(tiny_dir, tmp_path):
    """Upstream ships pytorch_model-0000N-of-0000M.bin with pytorch_model.bin.index.json."""
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    state = model.state_dict()
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out)
    for name, part in halves.items():
        torch.save({k: state[k].half() for k in part}, out / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_model(out, dtype="float16", device="cpu")
    torch.testing.assert_close(loaded.state_dict()["transformer.output_layer.weight"], state["transformer.output_layer.weight"].half())


def test_missing_and_unexpected_keys_are_named(tiny_dir, tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out)
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state["transformer.output_layer.weight"]
    state["transformer.extra.weight"] = torch.zeros(1)
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_model(out, device="cpu")
    assert "missing keys (1): transformer.output_layer.weight" in str(info.value)
    assert "unexpected keys (1): transformer.extra.weight" in str(info.value)


def test_no_weights_is_a_user_error(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    with pytest.raises(UserError, match="no weights found"):
        load_model(tmp_path, device="cpu")


def test_prefix_checkpoint_round_trip_holds_only_prefix_keys(tiny_dir, tmp_path):
    torch.manual_seed(3)
    model = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=6, prefix_projection=True)
    out = save_prefix(model, tmp_path / "prefix")
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(k.startswith("transformer.prefix_encoder.") for k in saved)
    assert json.loads((out / "config.json").read_text())["pre_seq_len"] == 6
    torch.manual_seed(4)
    other = load_model(tiny_dir, dtype="float32", device="cpu", pre_seq_len=6, prefix_projection=True)
    assert not _same_state(model, other)
    load_prefix(other, out)
    assert _same_state(model, other)


def test_prefix_checkpoint_that_does_not_fit_is_refused(tiny_dir, tmp_path):
    out = save_prefix(load_model(tiny_dir, device="cpu", pre_seq_len=6), tmp_path / "p6")
    with pytest.raises(UserError, match="pre_seq_len / prefix_projection differ"):
        load_prefix(load_model(tiny_dir, device="cpu", pre_seq_len=4), out)
    with pytest.raises(UserError, match="needs a model loaded with pre_seq_len"):
        load_prefix(load_model(tiny_dir, device="cpu"), out)


def test_saving_never_leaves_a_partial_directory(tiny_dir, tmp_path, monkeypatch):
    model = load_model(tiny_dir, device="cpu")
    import glm_portable.modeling.loading as loading

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "write_weights", boom)
    with pytest.raises(RuntimeError):
        save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
