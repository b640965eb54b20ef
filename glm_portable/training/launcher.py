"""Multi-process launch (torch's elastic launcher) and the plan that ``train --dry-run`` prints."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import torch

from glm_portable.backends import DEVICE_ENV, Backend, BackendUnavailable, get_backend, select_backend
from glm_portable.data import check_compatible, template_for
from glm_portable.modeling import ChatGLMConfig, load_config, load_tokenizer, resolve_dtype

from .deepspeed_config import build_deepspeed_config
from .methods import get_method
from .options import TrainOptions

LAUNCHED_ENV = "GLM_PORTABLE_LAUNCHED"


def is_launched_child() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1"


def visible_devices(options: TrainOptions, backend: Backend) -> list[int] | None:
    """Devices 0..nproc-1 unless the user already narrowed them with the backend's variable."""
    if backend.visible_devices_var is None or os.environ.get(backend.visible_devices_var):
        return None
    return list(range(options.nproc))


def child_environment(options: TrainOptions, backend: Backend) -> dict[str, str]:
    return {**backend.child_env(visible_devices(options, backend)), LAUNCHED_ENV: "1"}


LAUNCH_FIELDS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")  # the launcher's, not the children's


def launcher_command(options: TrainOptions, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={options.nproc}",
            f"--nnodes={options.nnodes}", f"--node_rank={options.node_rank}", f"--master_addr={options.master_addr}",
            f"--master_port={options.master_port}", "-m", "glm_portable.cli", *argv]


def launch(options: TrainOptions, backend: Backend, command: list[str]) -> int:
    """Run ``nproc`` processes of ``command`` (a subcommand and its flags, without the launch flags: torch's
    launcher would misread ``--nproc`` as its own ``--nproc-per-node``) on this node; returns the launcher's exit
    code, or 2 when the processes stopped on a user mistake (each has said why, once is shown)."""
    env = {**os.environ, **child_environment(options, backend)}
    process = subprocess.Popen(launcher_command(options, command), env=env, stderr=subprocess.PIPE,
                               text=True, errors="replace")
    user_mistake = LauncherOutput(sys.stderr).relay(process.stderr)
    code = process.wait()
    return 2 if code and user_mistake else code


class LauncherOutput:
    """Passes the processes' stderr through, leaving out torch's launcher report of a child that exited 2.

    That report (a ChildFailedError traceback and a summary table) follows the child's own one-line
    message; for a user mistake it only repeats it as a crash. Other failures keep everything.
    Identical error lines from several ranks are shown once.
    """

    def __init__(self, out) -> None:
        self.out = out
        self.shown_errors: set[str] = set()

    def relay(self, stream) -> bool:
        """Relay ``stream``; True when the launcher reported a child that exited 2 (its report is dropped)."""
        held: list[str] = []  # a traceback, until its last line says whose it is
        in_report = user_mistake = False
        for line in stream:
            if in_report:
                held.append(line)
                user_mistake = user_mistake or ("exitcode" in line and ": 2 " in line)
            elif held:
                held.append(line)
                if line.startswith((" ", "\t", "Traceback")):
                    continue
                in_report = "ChildFailedError" in line
                if not in_report:
                    self._write(held)
                    held = []
            elif line.startswith("Traceback (most recent call last):"):
                held.append(line)
            elif not ("failed (exitcode: 2)" in line and "elastic" in line):
                self._write([line])
        if held and not user_mistake:
            self._write(held)
        return user_mistake

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            if line.startswith("error:"):
                if line in self.shown_errors:
                    continue
                self.shown_errors.add(line)
            self.out.write(line)
        self.out.flush()


def trainable_parameters(options: TrainOptions, shape: ChatGLMConfig | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts, from the config alone (meta tensors, no weights read):
    ``options.model``'s, or ``shape`` for a benchmark's random-weight model."""
    config = shape if shape is not None else load_config(options.model)
    return get_method(options.method).count_parameters(config, options)


def dry_run_plan(options: TrainOptions) -> dict[str, Any]:
    """The plan for the selected device; for a device named with --device but absent here, the plan it
    would run (bf16 assumed unless --dtype), so that multi-card runs can be prepared on any machine."""
    try:
        selection = select_backend(options.device)
    except BackendUnavailable as exc:
        backend = get_backend((options.device or os.environ.get(DEVICE_ENV, "")).strip().lower())
        dtype = resolve_dtype(options.dtype or "bfloat16", backend)
        return plan(options, backend, f"not available here, planned anyway: {str(exc).splitlines()[0]}", dtype)
    return plan(options, selection.backend, selection.reason)


def plan(options: TrainOptions, backend: Backend, reason: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a run would do, checked as far as it can be without loading weights."""
    tokenizer = load_tokenizer(options.model)
    manifest = check_compatible(options.data, tokenizer, template_for(tokenizer).name, options.model)
    dtype = dtype or resolve_dtype(options.dtype, backend)
    trainable, total = trainable_parameters(options)
    processes = options.nproc * options.nnodes
    launched = processes > 1 or options.deepspeed is not None
    env = child_environment(options, backend) if launched else {}
    return {
        "device": {"backend": backend.name, "reason": reason, "dist_backend": backend.dist_backend if launched else None},
        "processes": {"nnodes": options.nnodes, "nproc_per_node": options.nproc, "world_size": processes,
                      "node_rank": options.node_rank, "master": f"{options.master_addr}:{options.master_port}",
                      "command": launcher_command(options, ["train", "..."]) if launched else None},
        "environment": env,
        "precision": {"dtype": str(dtype).removeprefix("torch."), "loss_scaling": backend.needs_loss_scaling(dtype),
                      "trainable_dtype": "float32"},
        "data": {"path": str(options.data), "rows": manifest["splits"]["train"]["rows"], "template": manifest["template"],
                 "padding": options.padding or backend.default_padding(),
                 "fixed_length": manifest["limits"]["fixed_length"]},
        "training": {"method": options.method, "trainable_parameters": trainable, "total_parameters": total,
                     "global_batch": options.batch_size * options.grad_accum * processes, "lr": options.lr,
                     "max_steps": options.max_steps, "save_steps": options.save_steps, "output": str(options.output)},
        "deepspeed": build_deepspeed_config(options.deepspeed, backend.deepspeed_dtype(dtype), options.offload,
                                            options.deepspeed_config) if options.deepspeed else None,
    }
