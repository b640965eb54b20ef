"""The CPU backend: always available, fp32 by default, gloo for multi-process runs."""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass, replace

import torch

from .base import Availability, Backend, MemoryStats
from .kernels import PORTABLE_KERNELS, Kernels, reference_varlen_attention
from .varlen import PackedRows

# From this pack length on, packed rows one at a time beat the dense block mask on CPU (training rows/s: 0.97x
# at 384, 1.09x at 768, 1.30x at 1536; docs/results/speed-cpu).
ROWS_AT_A_TIME_FROM = 512


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows, scale: float
                      ) -> torch.Tensor:
    if rows.max_q >= ROWS_AT_A_TIME_FROM:
        return reference_varlen_attention(q, k, v, rows, scale)
    return PORTABLE_KERNELS.attend_packed(q, k, v, rows, scale)


CPU_KERNELS = replace(PORTABLE_KERNELS, name=f"portable (sdpa; packs of {ROWS_AT_A_TIME_FROM}+ a row at a time)",
                      packed_attention=_packed_attention)


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


@dataclass
class CpuBackend(Backend):
    name: str = "cpu"
    dist_backend: str = "gloo"
    visible_devices_var: str | None = None
    deepspeed_accelerator: str = "cpu"
    install_hint: str = "the CPU backend is always available"
    is_accelerator: bool = False

    def availability(self) -> Availability:
        return Availability(True)

    def device_count(self) -> int:
        return 1

    def device_names(self) -> list[str]:
        return [_cpu_model_name()]

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        """Processes share the host; there is nothing to bind."""

    def supports_bf16(self) -> bool:
        return True

    def default_dtype(self) -> torch.dtype:
        """fp32: half precision on CPU is slower and only worth it when asked for."""
        return torch.float32

    def synchronize(self) -> None:
        """CPU ops are synchronous."""

    def kernels(self, dtype: torch.dtype | None = None) -> Kernels:
        """The portable kernels; long packs attend a row at a time (``ROWS_AT_A_TIME_FROM``)."""
        return CPU_KERNELS

    def memory_stats(self, local_rank: int = 0) -> MemoryStats:
        """Process memory: resident set now and its high-water mark (ru_maxrss is in KiB on Linux)."""
        rss = _resident_bytes()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return MemoryStats(allocated=rss, peak_allocated=max(peak, rss), reserved=rss)

    def reset_peak_memory(self, local_rank: int = 0) -> None:
        """The kernel's high-water mark cannot be reset; peaks are per process."""
