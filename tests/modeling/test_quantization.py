"""A quantized frozen base: which layers, what it computes, pre-quantized directories, refusals."""

import shutil

import pytest
import torch
from torch import nn

from glm_portable.backends.quantized import dequantize
from glm_portable.errors import UserError
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.checkpoint import write_weights
from glm_portable.modeling.quantization import QuantizedLinear, quantization_bits, quantized_layers
from glm_portable.modeling.tiny import make_tiny_model
from glm_portable.jsonfile import read_json_object, write_json_object


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny1", family="chatglm", seed=3)


@pytest.fixture(params=["chatglm3", "chatglm"])
def model_dir(request, tiny_dir, v1_dir):
    return tiny_dir if request.param == "chatglm3" else v1_dir


def _logits(model, model_dir):
    """Logits of a left-padded batch at its real positions."""
    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer.pad([tokenizer.encode(text) for text in ("类型#裙*颜色#红色", "你好")])
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def _dequantized_copy(model):
    """The quantized model with each quantized layer replaced by a plain Linear holding its dequantized weight."""
    for name, layer in quantized_layers(model).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(dequantize(layer.weight, layer.weight_scale, layer.bits, torch.float32))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, dense)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_block_linear_layers_are_quantized(model_dir, bits):
    model = load_model(model_dir, dtype="float32", device="cpu", pre_seq_len=4, quantization_bit=bits)
    layers = quantized_layers(model)
    assert len(layers) == 4 * model.config.num_layers
    assert all(".layers." in name for name in layers)
    assert all(name.split(".")[-1] in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h") for name in layers)
    plain = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(".layers." not in name for name in plain)  # output layer and prefix encoder keep their precision
    assert model.get_output_embeddings().weight.dtype == torch.float32
    state = model.state_dict()
    for name, layer in layers.items():
        assert state[f"{name}.weight"].dtype == torch.int8
        assert state[f"{name}.weight"].shape == (layer.out_features, layer.in_features * bits // 8)
        assert state[f"{name}.weight_scale"].shape == (layer.out_features,)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "prefix_encoder" not in name)
    assert quantization_bits(model) == bits


def test_quantized_logits_equal_the_dequantized_reference_and_stay_near_16_bit(model_dir):
    full = _logits(load_model(model_dir, dtype="float32", device="cpu"), model_dir)
    differences = {}
    for bits in (8, 4):
        quantized = load_model(model_dir, dtype="float32", device="cpu", quantization_bit=bits)
        logits = _logits(quantized, model_dir)
        reference = _logits(_dequantized_copy(quantized), model_dir)
        assert (logits - reference).abs().max() < 1e-5
        differences[bits] = (logits - full).abs().max().item()
    scale = full.abs().max().item()
    assert 0 < differences[8] < differences[4] < 0.3 * scale
    assert differences[8] < 0.05 * scale


def _pre_quantized(model_dir, out, bits):
    """A directory laid out as THUDM's int4/int8 ones: quantization_bit in config.json, int8 weights and scales."""
    model = load_model(model_dir, dtype="float32", device="cpu", quantization_bit=bits)
    shutil.copytree(model_dir, out)
    for weights in out.glob("*.safetensors*"):
        weights.unlink()
    write_weights(model.state_dict(), out)
    config = read_json_object(out / "config.json")
    config["quantization_bit"] = bits
    write_json_object(out / "config.json", config)
    return model


def test_a_pre_quantized_directory_loads_as_it_is_stored(model_dir, tmp_path):
    stored = _pre_quantized(model_dir, tmp_path / "int4", 4)
    loaded = load_model(tmp_path / "int4", dtype="float32", device="cpu")
    assert quantization_bits(loaded) == 4
    assert torch.equal(_logits(loaded, model_dir), _logits(stored, model_dir))
    with pytest.raises(UserError, match="quantized to 4 bits; --quantization-bit 8 cannot change that"):
        load_model(tmp_path / "int4", device="cpu", quantization_bit=8)


def test_pre_quantized_directories_the_loader_cannot_read_are_refused(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "int3")
    config = read_json_object(tmp_path / "int3" / "config.json")
    write_json_object(tmp_path / "int3" / "config.json", {**config, "quantization_bit": 3})
    with pytest.raises(UserError, match="quantization_bit=3 .*4 or 8 bits"):
        load_model(tmp_path / "int3", device="cpu")


def test_quantized_embeddings_are_refused(v1_dir, tmp_path):
    shutil.copytree(v1_dir, tmp_path / "qe")
    config = read_json_object(tmp_path / "qe" / "config.json")
    write_json_object(tmp_path / "qe" / "config.json",
                      {**config, "quantization_bit": 4, "quantization_embeddings": True})
    with pytest.raises(UserError, match="quantization_embeddings=true"):
        load_model(tmp_path / "qe", device="cpu")


def test_16_bit_weights_into_an_unquantized_model_of_int8_keys_are_refused(tiny_dir, tmp_path):
    _pre_quantized(tiny_dir, tmp_path / "int8", 8)
    config = read_json_object(tmp_path / "int8" / "config.json")
    write_json_object(tmp_path / "int8" / "config.json", {**config, "quantization_bit": 0})
    with pytest.raises(UserError, match="torch.int8 vs model torch.float32"):
        load_model(tmp_path / "int8", dtype="float32", device="cpu")


def test_an_odd_input_width_cannot_pack_four_bits():
    with pytest.raises(UserError, match="two input features a byte"):
        QuantizedLinear(7, 4, bias=False, bits=4)
