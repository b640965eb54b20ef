"""DeepSpeed configuration from the backend and the flags (THUDM's / Ascend's ZeRO-2 recipe), merged with a user's JSON.

Batch sizes, accumulation, learning rate and clipping are left "auto" so that transformers fills
them from the run's own options, which keeps the two from disagreeing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object

STAGES = {"zero2": 2, "zero3": 3}
BUCKET = 5e8


def build_deepspeed_config(stage_name: str, dtype: torch.dtype, offload: bool = False,
                           user_config: Optional[Path] = None) -> dict[str, Any]:
    """``dtype`` is the compute precision: bf16, fp16 (THUDM's dynamic loss scale, docs/thudm-compatibility.md) or fp32."""
    if stage_name not in STAGES:
        raise UserError(f"--deepspeed {stage_name!r}: expected one of {', '.join(STAGES)}")
    zero: dict[str, Any] = {
        "stage": STAGES[stage_name], "allgather_partitions": True, "allgather_bucket_size": BUCKET,
        "reduce_scatter": True, "reduce_bucket_size": BUCKET, "overlap_comm": True, "contiguous_gradients": True,
    }
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }
    if dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    elif dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    if user_config is not None:
        config = merge(config, read_json_object(user_config))
    return config


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested merge: the user's values win, key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
