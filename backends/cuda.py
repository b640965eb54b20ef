"""The CUDA backend: NVIDIA GPUs through a CUDA build of torch, nccl for multi-process runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .base import Availability, Backend

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets; override with --peak-tflops.
CUDA_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "A800": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6},
    "V100": {"float16": 125.0, "float32": 15.7},
}


@dataclass
class CudaBackend(Backend):
    name: str = "cuda"
    dist_backend: str = "nccl"
    visible_devices_var: str | None = "CUDA_VISIBLE_DEVICES"
    deepspeed_accelerator: str = "cuda"
    install_hint: str = (
        "install a CUDA build of torch (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu126`) "
        "on a machine with an NVIDIA driver, then `source env/cuda.sh`"
    )
    peak_tflops_table: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: CUDA_PEAK_TFLOPS)
    env_vars: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES",)

    def availability(self) -> Availability:
        if not torch.backends.cuda.is_built():
            return Availability(False, f"this torch ({torch.__version__}) is not a CUDA build")
        if not torch.cuda.is_available():
            visible = os.environ.get(self.visible_devices_var or "", "<unset>")
            return Availability(False, f"no CUDA device visible (driver missing or CUDA_VISIBLE_DEVICES={visible})")
        return Availability(True)
