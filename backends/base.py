"""The backend interface: everything the device-neutral core may ask of a device family."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .kernels import PORTABLE_KERNELS, Kernels

PEAK_TFLOPS_ENV = "GLM_PORTABLE_PEAK_TFLOPS"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and in words why not."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class MemoryStats:
    """Bytes on one device: now in use by tensors, the peak since the last reset, and reserved by the allocator."""

    allocated: int
    peak_allocated: int
    reserved: int


@dataclass
class Backend:
    """One device family (cpu, cuda, npu).

    The base class implements the generic behaviour through ``torch.get_device_module`` and
    ``torch.accelerator`` so that subclasses only write what their vendor does differently.
    """

    name: str
    dist_backend: str
    visible_devices_var: str | None
    deepspeed_accelerator: str
    install_hint: str
    peak_tflops_table: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    is_accelerator: bool = True
    static_shapes: bool = False
    compile_backend: str | None = "inductor"  # torch.compile's backend for `train --compile`; None: not offered
    env_vars: tuple[str, ...] = ()  # the variables that change what this backend does, for `env`

    def toolkit_versions(self) -> dict[str, str | None]:
        """The vendor toolkit's version(s) beside the Python libraries, for records and `env` (none by default)."""
        return {}

    def availability(self) -> Availability:
        raise NotImplementedError

    def is_available(self) -> bool:
        return self.availability().available

    def module(self) -> Any:
        """The ``torch.<name>`` module, reached without naming it in the core."""
        return torch.get_device_module(self.name)

    def device_count(self) -> int:
        return self.module().device_count() if self.is_available() else 0

    def device_names(self) -> list[str]:
        return [self.module().get_device_name(i) for i in range(self.device_count())]

    def device(self, local_rank: int = 0) -> torch.device:
        """The device a process with this local rank drives (after the launcher narrowed the visible set)."""
        return torch.device(self.name, local_rank)

    def set_device(self, local_rank: int) -> None:
        self.module().set_device(local_rank)

    def supports_bf16(self) -> bool:
        return bool(self.module().is_bf16_supported())

    def default_dtype(self) -> torch.dtype:
        """bf16 where the hardware has it, else fp16 (trained with loss scaling)."""
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def default_padding(self) -> str:
        """How training batches are padded unless asked: to one fixed length where every new shape costs a
        graph compile (``static_shapes``), else to each batch's longest row."""
        return "fixed" if self.static_shapes else "dynamic"

    def default_cache(self) -> str:
        """The decoding cache unless asked: preallocated (one shape every step) where every new shape costs a
        graph compile, else the growing one."""
        return "static" if self.static_shapes else "dynamic"

    def deepspeed_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The precision DeepSpeed trains in: the requested one on an accelerator, fp32 on the host (DeepSpeed's
        CPU accelerator has no half-precision training)."""
        return dtype if self.is_accelerator else torch.float32

    def needs_loss_scaling(self, dtype: torch.dtype) -> bool:
        """fp16 gradients underflow without a dynamic loss scale; bf16 and fp32 do not need one."""
        return dtype == torch.float16

    def synchronize(self) -> None:
        self.module().synchronize()

    def memory_stats(self, local_rank: int = 0) -> MemoryStats:
        mod = self.module()
        return MemoryStats(
            allocated=int(mod.memory_allocated(local_rank)),
            peak_allocated=int(mod.max_memory_allocated(local_rank)),
            reserved=int(mod.memory_reserved(local_rank)),
        )

    def reset_peak_memory(self, local_rank: int = 0) -> None:
        self.module().reset_peak_memory_stats(local_rank)

    def seed(self, seed: int) -> None:
        """Seed Python, torch's CPU generator and every device generator of this backend."""
        random.seed(seed)
        torch.manual_seed(seed)
        if self.is_available() and self.name != "cpu":
            self.module().manual_seed_all(seed)

    def peak_tflops(self, dtype: torch.dtype, device_name: str | None = None, override: float | None = None) -> float | None:
        """Dense peak TFLOP/s for MFU: the override, then $GLM_PORTABLE_PEAK_TFLOPS, then the table.

        The table is matched by substring of the device name (e.g. "H100"), since vendors' names vary.
        Returns None when nothing matches, so that callers report MFU as unknown rather than invent it.
        """
        if override is not None:
            return float(override)
        if os.environ.get(PEAK_TFLOPS_ENV):
            return float(os.environ[PEAK_TFLOPS_ENV])
        name = device_name if device_name is not None else (self.device_names() or [""])[0]
        key = str(dtype).removeprefix("torch.")
        for pattern, peaks in self.peak_tflops_table.items():
            if pattern.lower() in name.lower() and key in peaks:
                return peaks[key]
        return None

    def prepare_process(self) -> None:
        """Per-process setup before any model work.

        Pins DeepSpeed's accelerator: DeepSpeed picks an NPU whenever torch_npu imports, ahead of
        CUDA and even when another backend was chosen, so it must never be left to detect.
        """
        os.environ["DS_ACCELERATOR"] = self.deepspeed_accelerator

    def child_env(self, devices: list[int] | None = None) -> dict[str, str]:
        """Environment a launcher adds for its child processes: visible devices and the DeepSpeed accelerator."""
        env = {"DS_ACCELERATOR": self.deepspeed_accelerator}
        if self.visible_devices_var and devices is not None:
            env[self.visible_devices_var] = ",".join(str(d) for d in devices)
        return env

    def kernels(self, dtype: torch.dtype | None = None) -> Kernels:
        """The attention / RMSNorm kernels for this backend and dtype; the portable path by default."""
        return PORTABLE_KERNELS
