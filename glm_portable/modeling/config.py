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

# Upstream chatglm2-6b defaults (docs/architecture.md); chatglm3-6b differs only in seq_length.
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
    DESCRIPTION = "ChatGLM2/3"
    REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
    DEFAULTS = UPSTREAM_DEFAULTS
    MODEL_FIELDS = MODEL_FIELDS

    def __init__(self, **kwargs: Any) -> None:
        upstream = dict(kwargs.pop("upstream", {}) or {})
        for key in self.MODEL_FIELDS:
            value = kwargs.pop(key, upstream.get(key, self.DEFAULTS[key]))
            upstream[key] = value
            setattr(self, key, value)
        self.upstream = upstream
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in upstream:
                kwargs.setdefault(key, upstream[key])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.num_hidden_layers = self.num_layers
        self._derive_fields()

    def _derive_fields(self) -> None:
        """transformers' generic names for our fields."""
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
        problems += pre_quantized_problems(self)
        if self.num_attention_heads % self.kv_groups:
            problems.append(f"num_attention_heads={self.num_attention_heads} not divisible by {self.kv_groups} groups")
        if problems:
            raise UserError(f"{source}: unsupported configuration: " + "; ".join(problems))

    def upstream_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json content: every upstream field, unknown ones preserved."""
        data = dict(self.DEFAULTS)
        data.update(self.upstream)
        for key in self.MODEL_FIELDS:
            data[key] = getattr(self, key)
        if dtype is not None:
            data["torch_dtype"] = dtype
        return data

    def save(self, directory: Path, dtype: str | None = None) -> None:
        write_json_object(Path(directory) / "config.json", self.upstream_dict(dtype))


V1_DEFAULTS: dict[str, Any] = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "num_layers": 28,
    "vocab_size": 130528,
    "hidden_size": 4096,
    "inner_hidden_size": 16384,
    "num_attention_heads": 32,
    "max_sequence_length": 2048,
    "layernorm_epsilon": 1e-5,
    "position_encoding_2d": True,
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "use_cache": True,
    "torch_dtype": "float16",
}


class ChatGLM1Config(ChatGLMConfig):
    """The architecture of ChatGLM-6B (first generation); see docs/chatglm-6b.md."""

    DESCRIPTION = "ChatGLM-6B"
    REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size")
    DEFAULTS = V1_DEFAULTS
    MODEL_FIELDS = tuple(k for k in V1_DEFAULTS if k not in {"model_type", "architectures", "torch_dtype"})

    def __init__(self, **kwargs: Any) -> None:  # defined, so that transformers' dataclass wrapper keeps ours
        super().__init__(**kwargs)

    def _derive_fields(self) -> None:
        """The ChatGLM2/3 names the shared code reads (embedding rows, head size, length limit)."""
        self.padded_vocab_size = self.vocab_size
        self.kv_channels = self.hidden_size // self.num_attention_heads
        self.seq_length = self.max_sequence_length

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Each half of a head rotates (by position, then by block position), NeoX-style."""
        return self.kv_channels // 2

    def validate(self, source: str) -> None:
        problems = []
        if not self.position_encoding_2d:
            problems.append("position_encoding_2d=false (ChatGLM-6B uses 2-D positions)")
        problems += pre_quantized_problems(self)
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            problems.append(f"hidden_size={self.hidden_size} must split into {self.num_attention_heads} heads whose "
                            "size is a multiple of 4")
        if problems:
            raise UserError(f"{source}: unsupported configuration: " + "; ".join(problems))


def pre_quantized_problems(config: ChatGLMConfig) -> list[str]:
    """What of a pre-quantized directory (``quantization_bit`` in config.json) the native loader cannot read: bit
    widths other than THUDM's 4 and 8, and quantized embeddings (ChatGLM-6B's ``quantization_embeddings``)."""
    problems = []
    bits = config.quantization_bit or 0
    if bits not in (0, 4, 8):
        problems.append(f"quantization_bit={bits} (THUDM's quantized weights are 4 or 8 bits)")
    if bits and config.upstream.get("quantization_embeddings"):
        problems.append("quantization_embeddings=true (quantized embeddings; load the fp16 model, or the int4 one "
                        "whose embeddings stay fp16)")
    return problems


def is_first_generation(data: dict[str, Any]) -> bool:
    """ChatGLM-6B configs carry ``position_encoding_2d`` / ``inner_hidden_size``; ChatGLM2/3 ones do not."""
    return "position_encoding_2d" in data or "inner_hidden_size" in data


def load_config(model_dir: str | Path) -> ChatGLMConfig:
    """Read ``config.json`` of a ChatGLM-6B, ChatGLM2 or ChatGLM3 directory; unknown fields are kept, not rejected."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a ChatGLM model directory)")
    data = read_json_object(path)
    config_class = ChatGLM1Config if is_first_generation(data) else ChatGLMConfig
    for key in config_class.REQUIRED:
        if key not in data:
            raise UserError(f"{path}: field {key!r} missing (expected a {config_class.DESCRIPTION} config)")
    check_field_types(data, str(path), config_class.DEFAULTS)
    config = config_class(upstream=data)
    config.validate(str(path))
    return config


def check_field_types(data: dict[str, Any], source: str, defaults: dict[str, Any] = UPSTREAM_DEFAULTS) -> None:
    """Each known field must have its default's type (an int may stand for a float; null where the default is)."""
    for key, default in defaults.items():
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
                   "num_attention_heads", "seq_length", "multi_query_group_num", "vocab_size", "inner_hidden_size",
                   "max_sequence_length")
