"""The CUDA backend: NVIDIA GPUs through a CUDA build of torch, nccl for multi-process runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from .base import Availability, Backend
from .kernels import PORTABLE_KERNELS, Kernels
from .varlen import flash_varlen_attention_fn

FLASH_MIN_CAPABILITY = (8, 0)  # flash attention's kernels: Ampere and newer

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

    def kernels(self, dtype: torch.dtype | None = None) -> Kernels:
        """SDPA for padded rows (torch picks flash, cuDNN or memory-efficient); packed rows through torch's flash
        varlen kernel where it runs (half dtypes, Ampere or newer, a torch that has it), else the block mask."""
        varlen = flash_varlen_attention_fn()
        if (varlen is None or dtype not in (torch.float16, torch.bfloat16) or not self.is_available()
                or torch.cuda.get_device_capability() < FLASH_MIN_CAPABILITY):
            return PORTABLE_KERNELS
        return replace(PORTABLE_KERNELS, name="cuda (sdpa, flash varlen)", packed_attention=varlen)
