"""Which native model class a config builds: ChatGLM-6B (first generation) or ChatGLM2/3."""

from __future__ import annotations

from torch import nn

from .config import ChatGLM1Config, ChatGLMConfig
from .model import ChatGLMForConditionalGeneration
from .model_v1 import ROTARY_KEY, ChatGLM1ForConditionalGeneration
from .prefix import PREFIX_KEY


def causal_lm_class(config: ChatGLMConfig) -> type[nn.Module]:
    return ChatGLM1ForConditionalGeneration if isinstance(config, ChatGLM1Config) else ChatGLMForConditionalGeneration


def new_model(config: ChatGLMConfig) -> nn.Module:
    """The causal LM of ``config``'s architecture (initialised under whatever device context is active)."""
    return causal_lm_class(config)(config)


def optional_weight_prefixes(config: ChatGLMConfig) -> tuple[str, ...]:
    """Keys a model directory may lack: the P-Tuning prefix and the rotary buffers (recomputed when absent)."""
    if isinstance(config, ChatGLM1Config):
        return (PREFIX_KEY,) + tuple(f"transformer.layers.{i}{ROTARY_KEY}" for i in range(config.num_layers))
    return PREFIX_KEY, "transformer.rotary_pos_emb."
