"""What `glm-portable env` reports: backends, devices, dtypes, library versions, relevant variables."""

from __future__ import annotations

import glob
import os
import platform
import re
from importlib import metadata
from typing import Any

from glm_portable.backends import DEVICE_ENV, all_backends, select_backend

LIBRARIES = ("torch", "torch_npu", "transformers", "datasets", "deepspeed", "peft", "accelerate", "safetensors")
CANN_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/ascend-toolkit", "/opt/Ascend/ascend-toolkit/latest")
ENV_VARS = (
    DEVICE_ENV,
    "CUDA_VISIBLE_DEVICES",
    "ASCEND_RT_VISIBLE_DEVICES",
    "ASCEND_TOOLKIT_HOME",
    "DS_ACCELERATOR",
    "TORCH_DEVICE_BACKEND_AUTOLOAD",
    "HCCL_CONNECT_TIMEOUT",
    "HCCL_EXEC_TIMEOUT",
    "TASK_QUEUE_ENABLE",
    "GLM_PORTABLE_NPU_JIT_COMPILE",
    "GLM_PORTABLE_PEAK_TFLOPS",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cann_version() -> str | None:
    """CANN's toolkit version from its install info file, when a toolkit is found."""
    homes = [os.environ["ASCEND_TOOLKIT_HOME"]] if os.environ.get("ASCEND_TOOLKIT_HOME") else []
    for home in homes + list(CANN_HOMES):
        for info in glob.glob(os.path.join(home, "*", "ascend_toolkit_install.info")) + glob.glob(
            os.path.join(home, "ascend_toolkit_install.info")
        ):
            with open(info, encoding="utf-8", errors="replace") as f:
                match = re.search(r"^version=(.+)$", f.read(), re.MULTILINE)
            if match:
                return match.group(1).strip()
    return None


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
        "versions": {**library_versions(), "cann": cann_version()},
        "environment": {key: os.environ.get(key) for key in ENV_VARS if os.environ.get(key) is not None},
        "cpu": cpu_threads(),
    }
