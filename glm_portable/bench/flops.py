"""Model FLOPs per trained token, for MFU (model FLOPs utilisation).

Counted as PaLM's appendix B does, so that figures compare with published ones: a matmul weight
costs 2 FLOPs per token forward, 2 more for the input gradient and 2 more for its own gradient,
hence ~6N per token when every weight trains and ~4N when the base is frozen (P-Tuning, LoRA),
plus 12 · layers · heads · head_dim · key_length for attention's score and value products
(forward and both backward products; the causal half is not subtracted). Recomputation under
gradient checkpointing is not model work and is not counted. The input embedding is a lookup and
costs nothing; the output layer is a matmul and counts.
"""

from __future__ import annotations

import copy

import torch

from glm_portable.modeling import ChatGLMConfig, new_model
from glm_portable.training.methods import Method


def matmul_parameters(config: ChatGLMConfig) -> int:
    """Weights of every linear layer, the output layer included (meta tensors: nothing is allocated)."""
    config = copy.deepcopy(config)
    config.pre_seq_len = None
    with torch.device("meta"):
        model = new_model(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(config: ChatGLMConfig, method: Method, seq_length: int, prefix_length: int = 0,
                             trainable: int = 0) -> float:
    """FLOPs one trained token costs: the method's weight FLOPs (``6N`` full, ``4N + 6·adapters`` over a frozen
    base), plus attention over ``seq_length + prefix_length`` keys."""
    weights = method.weight_flops(matmul_parameters(config), trainable)
    heads_width = config.num_attention_heads * config.kv_channels
    attention = 12 * config.num_layers * heads_width * (seq_length + prefix_length)
    return float(weights + attention)


def mfu(flops_per_token: float, tokens_per_second_per_device: float, peak_tflops: float | None) -> float | None:
    """The fraction of the device's dense peak the model's work reaches; None when the peak is unknown."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_second_per_device / (peak_tflops * 1e12)
