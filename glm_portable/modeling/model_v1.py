"""Native ChatGLM-6B (first generation): upstream's parameter names and numerics, batch-first.

Module names mirror upstream's v1 file (``transformer.layers.N.attention.query_key_value``,
top-level ``lm_head``) so state dicts load by key name. The architecture (docs/chatglm-6b.md):
LayerNorm with bias, residuals scaled by sqrt(2·layers), tanh-GELU MLP, per-head interleaved
q/k/v, 2-D rotary (position and block position, NeoX-style halves), and a prefix-LM mask in which
the context attends bidirectionally. The outer interface equals the ChatGLM2/3 model's, so
training, evaluation, chat and serving take either.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import Cache

from glm_portable.backends.kernels import PORTABLE_KERNELS, Kernels

from .config import ChatGLM1Config
from .model import CausalLMForward, ChatGLMPreTrainedModel, generation_cache, tokens_in_cache
from .positions_v1 import v1_attention_mask, v1_position_ids
from .prefix import PrefixEncoder, prefix_key_values
from .quantization import QuantizedLinear
from .rotary import rotary_inv_freq

ROTARY_KEY = ".attention.rotary_emb."


class RotaryEmbedding1(nn.Module):
    """cos/sin tables from ``inv_freq``, a buffer because upstream checkpoints carry it per layer.

    Upstream keeps it in fp16, so its values are fp16-rounded; the angles are computed from it in fp32.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", self.default_inv_freq(), persistent=True)

    def default_inv_freq(self) -> torch.Tensor:
        return rotary_inv_freq(self.dims).half().float()

    def reset_inv_freq(self) -> None:
        self.inv_freq = self.default_inv_freq().to(self.inv_freq.device, self.inv_freq.dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[batch, seq, dims]`` (the angle table repeated for both halves) for ``[batch, seq]``."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = torch.cos(angles), torch.sin(angles)
        if dtype in (torch.float16, torch.bfloat16):
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` on ``[batch, heads, seq, dims]`` with tables ``[batch, seq, dims]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]


class SelfAttention1(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.rotary_emb = RotaryEmbedding1(self.head_dim // 2)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.kernels: Kernels = PORTABLE_KERNELS

    def forward(self, hidden, positions, mask, prefix_k, prefix_v, cache):
        batch, seq, _ = hidden.shape
        mixed = self.query_key_value(hidden).view(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))
        cos_p, sin_p = self.rotary_emb(positions[:, 0], hidden.dtype)
        cos_b, sin_b = self.rotary_emb(positions[:, 1], hidden.dtype)
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat((rotate_neox(q1, cos_p, sin_p), rotate_neox(q2, cos_b, sin_b)), dim=-1)
        k = torch.cat((rotate_neox(k1, cos_p, sin_p), rotate_neox(k2, cos_b, sin_b)), dim=-1)
        if cache is not None:
            if prefix_k is not None:
                cache.update(prefix_k, prefix_v, self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_k is not None:
            k = torch.cat((prefix_k, k), dim=2)
            v = torch.cat((prefix_v, v), dim=2)
        out = self.kernels.attention(q, k, v, mask, False, 1.0 / math.sqrt(self.head_dim))
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP1(nn.Module):
    """Linear → tanh-approximate GELU → Linear, with biases."""

    def __init__(self, config: ChatGLM1Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLM1Block(nn.Module):
    """``LN(x)·alpha + Attn(LN(x))``, then the same with the MLP; alpha = sqrt(2·num_layers)."""

    def __init__(self, config: ChatGLM1Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention1(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP1(config)
        self.alpha = math.sqrt(2 * config.num_layers)

    def forward(self, hidden, positions, mask, prefix_k, prefix_v, cache):
        normed = self.input_layernorm(hidden)
        hidden = normed * self.alpha + self.attention(normed, positions, mask, prefix_k, prefix_v, cache)
        normed = self.post_attention_layernorm(hidden)
        return normed * self.alpha + self.mlp(normed)


class ChatGLM1Model(nn.Module):
    """Embedding, the layer stack, the final LayerNorm and (with pre_seq_len) the prefix encoder."""

    def __init__(self, config: ChatGLM1Config) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLM1Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.pre_seq_len = config.pre_seq_len
        self.gradient_checkpointing = False
        if self.pre_seq_len:
            for param in self.parameters():
                param.requires_grad_(False)
            self.prefix_encoder = PrefixEncoder(
                config.pre_seq_len, config.num_layers, config.kv_groups, config.kv_channels, config.hidden_size,
                config.prefix_projection, narrow_projection=True,
            )
            self.prefix_dropout = nn.Dropout(0.1)

    def reset_inv_freq(self) -> None:
        for layer in self.layers:
            layer.attention.rotary_emb.reset_inv_freq()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Optional[Cache]]:
        batch, seq = input_ids.shape
        hidden = self.word_embeddings(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefix_len = self.pre_seq_len or 0
        prefix = (prefix_key_values(self.prefix_encoder, self.prefix_dropout, self.config, batch, hidden.dtype)
                  if prefix_len and past == 0 else None)
        past_tokens = past - prefix_len if past else 0
        if position_ids is None:
            if past_tokens:
                raise ValueError("ChatGLM-6B needs position_ids to continue on a cache (see prepare_inputs_for_generation)")
            position_ids = self.position_ids(input_ids, attention_mask)
        if attention_mask is not None and attention_mask.shape[-1] != past_tokens + seq:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past_tokens + seq}")
        mask = v1_attention_mask(position_ids[:, 1], attention_mask, past_tokens, prefix_len)
        cache = past_key_values if use_cache else None
        for index, layer in enumerate(self.layers):
            prefix_k, prefix_v = prefix[index] if prefix is not None else (None, None)
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, position_ids, mask, prefix_k,
                                                           prefix_v, None)
            else:
                hidden = layer(hidden, position_ids, mask, prefix_k, prefix_v, cache)
        return self.final_layernorm(hidden), cache

    def position_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        config = self.config
        return v1_position_ids(input_ids, attention_mask, config.bos_token_id,
                               (config.gmask_token_id, config.mask_token_id))


class ChatGLM1ForConditionalGeneration(CausalLMForward, ChatGLMPreTrainedModel, GenerationMixin):
    """The causal LM: ``transformer`` (ChatGLM1Model) plus the top-level ``lm_head``."""

    config_class = ChatGLM1Config
    _no_split_modules = ["GLM1Block"]

    def __init__(self, config: ChatGLM1Config) -> None:
        super().__init__(config)
        self.transformer = ChatGLM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.pre_seq_len:
            self.lm_head.requires_grad_(False)  # P-Tuning v2 trains the prefix alone
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.LayerNorm) and not any(module is m for m in self._prefix_modules()):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_kernels(self, kernels: Kernels) -> None:
        """Route attention and quantized matmuls through a backend's kernels (LayerNorm is torch's own on every
        backend)."""
        for module in self.modules():
            if isinstance(module, (SelfAttention1, QuantizedLinear)):
                module.kernels = kernels

    @property
    def kernels(self) -> Kernels:
        return self.transformer.layers[0].attention.kernels

    def reset_buffers(self) -> None:
        """The rotary tables' default values, for weights that do not carry them."""
        self.transformer.reset_inv_freq()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> dict:
        """Positions are recomputed from the whole sequence (so transformers' own position update, which would
        also move the position row, is not used); only the tokens the cache has not seen are fed."""
        past_key_values = generation_cache(past_key_values, cache)
        consumed = tokens_in_cache(past_key_values, self.config.pre_seq_len)
        positions = self.transformer.position_ids(input_ids, attention_mask)
        model_inputs = {
            "input_ids": input_ids[:, consumed:],
            "attention_mask": attention_mask,
            "position_ids": positions[..., consumed:],
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs
