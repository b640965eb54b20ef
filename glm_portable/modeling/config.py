"""ChatGLM2/3 configuration, read from and written to upstream ``config.json`` files.

Upstream fields are kept under their upstream names and written back verbatim (unknown fields too),
so that a directory we save is one that upstream code can load; transformers' own config
serialisation is not used for the file because it drops generation fields (``use_cache``) on 5.x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object, write_json_object

# Upstream chatglm2-6b defaults (REFERENCE §1); chatglm3-6b differs only in seq_length.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 32768,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "bias_dropout_fusion": True,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "apply_query_key_layer_scaling": True,
    "attention_softmax_in_fp32": True,
    "fp32_residual_connection": False,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "rope_ratio": 1.0,
    "original_rope": True,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_cache": True,
    "torch_dtype": "float16",
}
MODEL_FIELDS = tuple(k for k in UPSTREAM_DEFAULTS if k not in {"model_type", "architectures", "torch_dtype"})


class ChatGLMConfig(PretrainedConfig):
    """The architecture of ChatGLM2-6B / ChatGLM3-6B and their long-context variants."""

    model_type = "chatglm"

    def __init__(self, **kwargs: Any) -> None:
        upstream = dict(kwargs.pop("upstream", {}) or {})
        for key in MODEL_FIELDS:
            value = kwargs.pop(key, upstream.get(key, UPSTREAM_DEFAULTS[key]))
            upstream[key] = value
            setattr(self, key, value)
        self.upstream = upstream
        kwargs.setdefault("eos_token_id", upstream["eos_token_id"])
        kwargs.setdefault("pad_token_id", upstream["pad_token_id"])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.num_hidden_layers = self.num_layers
        self.vocab_size = self.padded_vocab_size

    @property
    def kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """ChatGLM rotates only the first half of each head."""
        return self.kv_channels // 2

    def validate(self, source: str) -> None:
        """Raise a UserError for fields our implementation cannot honour, naming the file."""
        problems = []
        if not self.rmsnorm:
            problems.append("rmsnorm=false (LayerNorm variants are not ChatGLM2/3)")
        if self.apply_residual_connection_post_layernorm:
            problems.append("apply_residual_connection_post_layernorm=true")
        if self.quantization_bit:
            problems.append(f"quantization_bit={self.quantization_bit} (quantized weights; load the fp16 model)")
        if self.num_attention_heads % self.kv_groups:
            problems.append(f"num_attention_heads={self.num_attention_heads} not divisible by {self.kv_groups} groups")
        if problems:
            raise UserError(f"{source}: unsupported configuration: " + "; ".join(problems))

    def upstream_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json content: every upstream field, unknown ones preserved."""
        data = dict(UPSTREAM_DEFAULTS)
        data.update(self.upstream)
        for key in MODEL_FIELDS:
            data[key] = getattr(self, key)
        if dtype is not None:
            data["torch_dtype"] = dtype
        return data

    def save(self, directory: Path, dtype: str | None = None) -> None:
        write_json_object(Path(directory) / "config.json", self.upstream_dict(dtype))


def load_config(model_dir: str | Path) -> ChatGLMConfig:
    """Read ``config.json`` of a ChatGLM2/3 directory; unknown fields are kept, not rejected."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a ChatGLM2/3 model directory)")
    data = read_json_object(path)
    if "position_encoding_2d" in data or "inner_hidden_size" in data:
        raise UserError(f"{path}: this is a ChatGLM-6B (first generation) model; the native implementation covers ChatGLM2/3")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        if key not in data:
            raise UserError(f"{path}: field {key!r} missing (expected a ChatGLM2/3 config)")
    check_field_types(data, str(path))
    config = ChatGLMConfig(upstream=data)
    config.validate(str(path))
    return config


def check_field_types(data: dict[str, Any], source: str) -> None:
    """Each known field must have its default's type (an int may stand for a float; null where the default is)."""
    for key, default in UPSTREAM_DEFAULTS.items():
        if key not in data or data[key] is None or default is None:
            continue
        value = data[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise UserError(f"{source}: field {key!r} is {value!r}; expected {type(default).__name__} "
                            f"(like {default!r})")
        if isinstance(default, int) and not isinstance(default, bool) and key in POSITIVE_FIELDS and value < 1:
            raise UserError(f"{source}: field {key!r} is {value}; expected a positive integer")


POSITIVE_FIELDS = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                   "num_attention_heads", "seq_length", "multi_query_group_num")
