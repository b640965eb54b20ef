"""Backend selection: ``--device auto|cpu|cuda|npu`` or $GLM_PORTABLE_DEVICE.

auto prefers an NPU, then a GPU, then the CPU, and always says why it chose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from glm_portable.errors import UserError

from .base import Availability, Backend, MemoryStats
from .cpu import CpuBackend
from .cuda import CudaBackend
from .kernels import PORTABLE_KERNELS, REFERENCE_KERNELS, Kernels
from .npu import NpuBackend

DEVICE_ENV = "GLM_PORTABLE_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")
AUTO_ORDER = ("npu", "cuda", "cpu")

__all__ = [
    "AUTO_ORDER",
    "Availability",
    "Backend",
    "BackendUnavailable",
    "DEVICE_CHOICES",
    "DEVICE_ENV",
    "Kernels",
    "MemoryStats",
    "PORTABLE_KERNELS",
    "REFERENCE_KERNELS",
    "Selection",
    "all_backends",
    "get_backend",
    "select_backend",
]


class BackendUnavailable(UserError):
    """The requested backend cannot run here; the message says how to get it."""


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str


def all_backends() -> dict[str, Backend]:
    """Fresh backend objects in auto-preference order."""
    return {"npu": NpuBackend(), "cuda": CudaBackend(), "cpu": CpuBackend()}


def get_backend(name: str) -> Backend:
    backends = all_backends()
    if name not in backends:
        raise UserError(f"unknown device {name!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    return backends[name]


def select_backend(requested: str | None = None) -> Selection:
    """Resolve the flag (or $GLM_PORTABLE_DEVICE, or auto) to an available backend.

    Raises BackendUnavailable naming the reason and the install hint when an explicit request fails.
    """
    source = "--device"
    if requested is None:
        requested = os.environ.get(DEVICE_ENV) or "auto"
        source = DEVICE_ENV if os.environ.get(DEVICE_ENV) else "default"
    requested = requested.strip().lower()
    if requested not in DEVICE_CHOICES:
        raise UserError(f"{source}: unknown device {requested!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    if requested != "auto":
        backend = get_backend(requested)
        status = backend.availability()
        if not status.available:
            raise BackendUnavailable(
                f"device {requested!r} ({source}) is not available: {status.reason}.\n"
                f"To use it: {backend.install_hint}."
            )
        return Selection(backend, f"requested by {source}")
    skipped = []
    for name, backend in all_backends().items():
        status = backend.availability()
        if status.available:
            why = "auto: " + (f"{name} is available" if not skipped else f"{'; '.join(skipped)}; {name} is available")
            return Selection(backend, why)
        skipped.append(f"{name} unavailable ({status.reason})")
    raise AssertionError("the CPU backend is always available")
