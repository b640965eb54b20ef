"""What `glm-portable env` reports: backends, devices, dtypes, library versions, relevant variables."""

from __future__ import annotations

import os
import platform
from typing import Any

from glm_portable.backends import DEVICE_ENV, all_backends, select_backend
from glm_portable.versions import library_versions

COMMON_ENV_VARS = (DEVICE_ENV, "DS_ACCELERATOR", "GLM_PORTABLE_PEAK_TFLOPS", "MASTER_ADDR", "MASTER_PORT")


def toolkit_versions() -> dict[str, str | None]:
    """Every backend's vendor toolkit versions (CANN for the NPU), as records and reports show them."""
    return {name: version for backend in all_backends().values() for name, version in backend.toolkit_versions().items()}


def cpu_threads() -> dict[str, Any]:
    """torch's intra-op threads against the cores this process may use and those the machine's load leaves free.

    More threads than free cores make every thread wait for the others: on a shared CPU fp32 training
    runs many times slower than with fewer threads, which looks like a slow tool rather than a busy machine.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, int(cores - load + 0.5))
    threads = torch.get_num_threads()
    warning = None
    if threads > free:
        warning = (f"torch uses {threads} threads but only about {free} of {cores} cores are free (load {load:.1f}); "
                   f"set OMP_NUM_THREADS={free} (or fewer) for steadier speed")
    return {"torch_threads": threads, "cores": cores, "load_1min": round(load, 2), "free_cores": free,
            "warning": warning}


def environment_report(requested: str | None = None) -> dict[str, Any]:
    """Everything as plain data, so that --json and the table print the same facts."""
    backends = {}
    for name, backend in all_backends().items():
        status = backend.availability()
        entry: dict[str, Any] = {"available": status.available, "reason": status.reason or None}
        if status.available:
            entry.update(
                device_count=backend.device_count(),
                device_names=backend.device_names(),
                bf16=backend.supports_bf16(),
                default_dtype=str(backend.default_dtype()).removeprefix("torch."),
                dist_backend=backend.dist_backend,
                visible_devices_var=backend.visible_devices_var,
                deepspeed_accelerator=backend.deepspeed_accelerator,
                kernels=backend.kernels(backend.default_dtype()).name,
            )
        backends[name] = entry
    selection = select_backend(requested)
    return {
        "selected": {"device": selection.backend.name, "reason": selection.reason},
        "backends": backends,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {**library_versions(), **toolkit_versions()},
        "environment": {key: os.environ[key] for key in _env_vars() if os.environ.get(key) is not None},
        "cpu": cpu_threads(),
    }


def _env_vars() -> tuple[str, ...]:
    """The variables that change what a run does: ours and every backend's own."""
    names = list(COMMON_ENV_VARS)
    for backend in all_backends().values():
        names += [name for name in backend.env_vars if name not in names]
    return tuple(names)
