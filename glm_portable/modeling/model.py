"""Native ChatGLM2/3: a batch-first transformers model with upstream's parameter names and numerics.

Module names mirror upstream's (``transformer.encoder.layers.N.self_attention.query_key_value`` …)
so that state dicts load and save by key name with no mapping. Attention and RMSNorm go through
the backend's kernels (``set_kernels``); the portable SDPA path is the default.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from glm_portable.backends.kernels import PORTABLE_KERNELS, Kernels, causal_mask
from glm_portable.backends.varlen import PackedRows, packed_rows

from .config import ChatGLMConfig
from .prefix import PrefixEncoder, prefix_key_values
from .quantization import QuantizedLinear
from .rotary import RotaryEmbedding, apply_rotary

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels: Kernels = PORTABLE_KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.kv_groups = config.kv_groups
        self.multi_query = config.multi_query_attention
        qkv_size = self.head_dim * (self.num_heads + 2 * self.kv_groups)
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)
        self.kernels: Kernels = PORTABLE_KERNELS

    def _split_qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q | k | v along the last dim (multi-query); per-head interleaved otherwise, as upstream lays them out."""
        batch, seq = mixed.shape[:2]
        if self.multi_query:
            q, k, v = mixed.split(
                [self.num_heads * self.head_dim, self.kv_groups * self.head_dim, self.kv_groups * self.head_dim], -1
            )
            q = q.view(batch, seq, self.num_heads, self.head_dim)
            k = k.view(batch, seq, self.kv_groups, self.head_dim)
            v = v.view(batch, seq, self.kv_groups, self.head_dim)
        else:
            q, k, v = mixed.view(batch, seq, self.num_heads, 3 * self.head_dim).split(self.head_dim, -1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        causal: bool,
        prefix_k: Optional[torch.Tensor],
        prefix_v: Optional[torch.Tensor],
        cache: Optional[Cache],
        packed: Optional[PackedRows] = None,
    ) -> torch.Tensor:
        """``packed``: the rows of a packed batch (``mask`` is then None)."""
        q, k, v = self._split_qkv(self.query_key_value(hidden))
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            if prefix_k is not None:
                cache.update(prefix_k, prefix_v, self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_k is not None:
            k = torch.cat((prefix_k, k), dim=2)
            v = torch.cat((prefix_v, v), dim=2)
        scale = 1.0 / math.sqrt(self.head_dim)
        if packed is not None:
            out = self.kernels.attend_packed(q, k, v, packed, scale)
        else:
            out = self.kernels.attention(q, k, v, mask, causal, scale)
        batch, _, seq, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: the up-projection's two halves are gate and value."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * value)


class GLMBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then h + MLP(RMSNorm(h))."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden, cos, sin, mask, causal, prefix_k, prefix_v, cache, packed=None):
        attn = self.self_attention(self.input_layernorm(hidden), cos, sin, mask, causal, prefix_k, prefix_v, cache,
                                   packed)
        hidden = hidden + F.dropout(attn, p=self.hidden_dropout, training=self.training)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + F.dropout(mlp, p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.post_layer_norm = config.post_layer_norm
        if self.post_layer_norm:
            self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, hidden, cos, sin, mask, causal, prefix, cache, packed=None):
        for index, layer in enumerate(self.layers):
            prefix_k, prefix_v = prefix[index] if prefix is not None else (None, None)
            if self.gradient_checkpointing and self.training and cache is None:
                hidden = self._gradient_checkpointing_func(
                    layer.__call__, hidden, cos, sin, mask, causal, prefix_k, prefix_v, None, packed
                )
            else:
                hidden = layer(hidden, cos, sin, mask, causal, prefix_k, prefix_v, cache, packed)
        return self.final_layernorm(hidden) if self.post_layer_norm else hidden


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def build_attention_mask(
    padding: Optional[torch.Tensor], query_len: int, key_len: int
) -> tuple[Optional[torch.Tensor], bool]:
    """(mask, causal) for queries that are the last ``query_len`` of ``key_len`` positions.

    Returns no mask when there is no padding: causal attention aligned to the last key (the kernels'
    convention) is then exact, behind a prefix or a cache too, so fused kernels run their fastest
    path. Query rows that would see no key at all (left padding) see every key, as upstream does, so
    no NaN can leak through a zero attention weight.
    """
    offset = key_len - query_len
    has_padding = padding is not None and not bool(padding.all())
    if not has_padding:
        return None, True
    device = padding.device if padding is not None else None
    positions = torch.arange(key_len, device=device)
    allowed = positions[None, :] <= (positions[offset:, None])
    allowed = allowed[None].expand(padding.shape[0] if padding is not None else 1, -1, -1)
    if padding is not None:
        allowed = allowed & padding[:, None, :].bool()
        if offset == 0:
            allowed = allowed | ~padding[:, :, None].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None], False


def static_cache_mask(padding: Optional[torch.Tensor], batch: int, query_len: int, key_len: int, slots: int,
                      device: torch.device) -> torch.Tensor:
    """``[batch, 1, query_len, slots]``: ``build_attention_mask`` over the ``key_len`` slots written so far (the
    queries being the last of them), the remaining slots of a preallocated cache closed."""
    if key_len > slots:
        raise ValueError(f"the static cache holds {slots} positions; this step needs {key_len}")
    mask, _ = build_attention_mask(padding, query_len, key_len)
    if mask is None:
        mask = causal_mask(query_len, key_len, device)[None, None].expand(batch, 1, -1, -1)
    return F.pad(mask, (0, slots - key_len), value=False)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, 0.02) weights, zero biases, unit norms; the prefix encoder keeps torch's defaults."""
        if any(module is m for m in self._prefix_modules()):
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, QuantizedLinear):
            shape = (module.out_features, module.in_features)
            module.set_dense_weight(torch.empty(shape, device=module.weight.device).normal_(std=0.02))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def _prefix_modules(self) -> list[nn.Module]:
        transformer = getattr(self, "transformer", self)
        encoder = getattr(transformer, "prefix_encoder", None)
        return list(encoder.modules()) if encoder is not None else []


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, rotary tables, the layer stack, the output layer and (with pre_seq_len) the prefix."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.rotary_dims, config.rope_ratio)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len:
            for param in self.parameters():
                param.requires_grad_(False)
            self.prefix_encoder = PrefixEncoder(
                config.pre_seq_len, config.num_layers, config.kv_groups, config.kv_channels,
                config.hidden_size, config.prefix_projection,
            )
            self.prefix_dropout = nn.Dropout(0.1)

    @property
    def kernels(self) -> Kernels:
        return self.encoder.layers[0].self_attention.kernels

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def prefix_key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return prefix_key_values(self.prefix_encoder, self.prefix_dropout, self.config, batch, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[Cache]]:
        """``cu_seqlens`` (packed training batches, with their restarting ``position_ids``: the rows' boundaries
        in the flattened ``batch * seq`` tokens): attention stays inside each row, and the P-Tuning prefix is
        seen by all (``Kernels.attend_packed``: a varlen kernel where the backend has one). A static
        cache (``StaticCache``, preallocated keys) gets a mask over all its slots, the unwritten ones closed."""
        batch, seq = input_ids.shape
        hidden = self.embedding(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        prefix_len = self.pre_seq_len or 0
        prefix = self.prefix_key_values(batch, hidden.dtype) if prefix_len and past == 0 else None
        past_tokens = past - prefix_len if past else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq, past_tokens, input_ids.device)
        padding = attention_mask
        if padding is not None and prefix_len:
            padding = torch.cat((padding.new_ones(batch, prefix_len), padding), dim=-1)
        key_len = past + (prefix_len if prefix is not None else 0) + seq
        if padding is not None and padding.shape[-1] != key_len:
            raise ValueError(f"attention_mask covers {padding.shape[-1]} positions, expected {key_len}")
        packed = None
        if cu_seqlens is not None:
            if position_ids is None or attention_mask is not None or past:
                raise ValueError("packed rows (cu_seqlens) need their position_ids, and no attention_mask or cache")
            packed = packed_rows(cu_seqlens, batch, seq, prefix_len if prefix is not None else 0)
            mask, causal = None, True
        elif use_cache and getattr(past_key_values, "is_compileable", False):
            mask, causal = static_cache_mask(padding, batch, seq, key_len, past_key_values.get_max_length(),
                                             input_ids.device), False
        else:
            mask, causal = build_attention_mask(padding, seq, key_len)
        cos, sin = self.rotary_pos_emb(position_ids, hidden.dtype, limit=past_tokens + seq)
        hidden = self.encoder(hidden, cos, sin, mask, causal, prefix, past_key_values if use_cache else None, packed)
        return hidden, past_key_values if use_cache else None


def positions_from_mask(
    attention_mask: Optional[torch.Tensor], seq: int, past_tokens: int, device: torch.device
) -> torch.Tensor:
    """0..n-1 over real tokens, 0 on left padding: what upstream's tokenizer hands the model."""
    if attention_mask is None:
        return torch.arange(past_tokens, past_tokens + seq, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[int | torch.Tensor] = None
) -> torch.Tensor:
    """Next-token cross-entropy in fp32, positions labelled -100 ignored.

    With ``num_items_in_batch`` (the labelled tokens of a whole gradient-accumulation window, which
    transformers' Trainer passes) the sum is divided by it, so accumulated micro-batches weigh every
    token equally; otherwise the mean over this batch.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    flat_logits, flat_labels = shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return _normalised(total, flat_labels, num_items_in_batch)


def _normalised(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[int | torch.Tensor]
                ) -> torch.Tensor:
    count = (labels != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device, dtype=total.dtype)


LOSS_CHUNK_ROWS = 1024  # fp32 logits of one chunk: 1024 × 65,024 × 4 bytes = 266 MB for ChatGLM2/3


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
    num_items_in_batch: Optional[int | torch.Tensor] = None, select_labelled: bool = True,
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """``causal_lm_loss(head(hidden), labels)`` without the whole batch's logits: the output layer runs on
    ``chunk_rows`` positions at a time, each chunk recomputed in backward (so no fp32 logits are kept), and
    with ``select_labelled`` only on positions that carry a label. Backends that compile per shape
    (``Kernels.static_shapes``) keep every position, so each chunk's shape is fixed by the batch's."""
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].to(hidden.device).reshape(-1)
    if select_labelled:
        keep = targets != IGNORE_INDEX
        states, targets = states[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_rows):
        piece, wanted = states[start:start + chunk_rows], targets[start:start + chunk_rows]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, piece, wanted, head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(piece, wanted, head)
    return _normalised(total, targets, num_items_in_batch)


def generation_cache(past_key_values: Optional[Cache], cache: Optional[Cache]) -> Optional[Cache]:
    """The cache ``generate()`` hands ``prepare_inputs_for_generation``: named ``cache`` since transformers 5.24,
    ``past_key_values`` before. Missing it would make every step recompute the whole sequence."""
    return past_key_values if past_key_values is not None else cache


def preallocated_cache(model: nn.Module, tokens: int) -> Optional[Cache]:
    """A StaticCache with room for ``tokens`` and the P-Tuning prefix, for models that decode on one (ChatGLM2/3,
    native; a peft wrapper is looked through); None for the others, which keep the growing cache."""
    inner = getattr(model, "get_base_model", lambda: model)()
    if not getattr(inner, "decodes_on_static_cache", False):
        return None
    from transformers import StaticCache

    return StaticCache(config=inner.config, max_cache_len=tokens + (inner.config.pre_seq_len or 0))


def tokens_in_cache(cache: Optional[Cache], prefix_len: Optional[int]) -> int:
    """How many of the sequence's tokens the cache holds (its first ``prefix_len`` slots are the prefix)."""
    past = int(cache.get_seq_length()) if cache is not None else 0
    return past - (prefix_len or 0) if past else 0


class CausalLMForward:
    """The causal-LM forward both generations share: their ``transformer``, then their output head
    (``get_output_embeddings``), the loss and the cache."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        use_cache = bool(use_cache) if use_cache is not None else (past_key_values is not None)
        packed = {"cu_seqlens": kwargs["cu_seqlens"]} if kwargs.get("cu_seqlens") is not None else {}
        hidden, cache = self.transformer(input_ids, attention_mask, position_ids, past_key_values, use_cache, **packed)
        head = self.get_output_embeddings()
        if labels is not None and self.training:
            # Training needs the loss alone: no logits tensor over the whole batch and vocabulary.
            loss = chunked_lm_loss(hidden, head, labels, kwargs.get("num_items_in_batch"),
                                   select_labelled=not self.kernels.static_shapes)
            return CausalLMOutputWithPast(loss, None, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = head(hidden)
        loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        return CausalLMOutputWithPast(loss, logits, cache)  # positional: the cache field is renamed in 5.24


class ChatGLMForConditionalGeneration(CausalLMForward, ChatGLMPreTrainedModel, GenerationMixin):
    """The causal LM: ``transformer`` (ChatGLMModel) plus loss, logits slicing and generation hooks."""

    decodes_on_static_cache = True  # see ``evaluation.generation``

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_kernels(self, kernels: Kernels) -> None:
        """Route attention, RMSNorm and quantized matmuls through a backend's kernels (see backends.Backend.kernels)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, SelfAttention, QuantizedLinear)):
                module.kernels = kernels

    @property
    def kernels(self) -> Kernels:
        return self.transformer.kernels

    def reset_buffers(self) -> None:
        """The rotary table's default values, for weights that do not carry them."""
        self.transformer.rotary_pos_emb.reset_inv_freq()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Optional[Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; the P-Tuning prefix occupies the first P cache slots."""
        past_key_values = generation_cache(past_key_values, cache)
        consumed = tokens_in_cache(past_key_values, self.config.pre_seq_len)
        model_inputs = {
            "input_ids": input_ids[:, consumed:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if position_ids is not None:
            model_inputs["position_ids"] = position_ids[:, consumed:]
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs
