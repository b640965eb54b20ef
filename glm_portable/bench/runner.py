"""One benchmark process: the training path users run (same Trainer, methods, DeepSpeed config), on
synthetic data, with every step timed and its loss kept.

Timing the real trainer rather than a bare forward/backward loop means the figures include what a
user pays for: the optimizer, gradient clipping, the collator and the DDP / ZeRO communication.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset
from transformers import TrainerCallback

from glm_portable.backends import Backend
from glm_portable.data import TrainCollator
from glm_portable.data.packing import PackedCollator, pack_rows
from glm_portable.errors import TrainingStopped, UserError
from glm_portable.jsonfile import read_json_object, write_json_object
from glm_portable.modeling import ChatGLMConfig, resolve_dtype
from glm_portable.modeling.remote import check_remote_dir
from glm_portable.patches import APPLIED
from glm_portable.process import start_process
from glm_portable.schema import to_argv
from glm_portable.training.launcher import LAUNCH_FIELDS, is_launched_child, launch, trainable_parameters
from glm_portable.training.methods import build_model, get_method
from glm_portable.training.options import TrainOptions
from glm_portable.training.trainer import (BatchCounter, GlmTrainer, gather_from_ranks, kernels_name,
                                           leave_process_group, token_weighted_loss, training_arguments, world)

from .flops import mfu, training_flops_per_token
from .record import build_record
from .options import BenchOptions, Workload
from .workload import synthetic_rows


@dataclass
class StepLog:
    """Per optimizer step: wall time (the device synchronised at each end), loss and gradient norm; and, as counted
    by the collator when the step ended, the rows, real tokens and computed positions drawn so far."""

    times: list[float] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    drawn: list[tuple[int, int, int]] = field(default_factory=list)


class StepTimer(TrainerCallback):
    def __init__(self, backend: Backend, log: StepLog, counter: BatchCounter) -> None:
        self.backend = backend
        self.log = log
        self.counter = counter
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.backend.synchronize()
        self.last = time.perf_counter()
        self.log.drawn.append((self.counter.rows, self.counter.tokens, self.counter.positions))

    def on_step_end(self, args, state, control, **kwargs):
        self.backend.synchronize()
        now = time.perf_counter()
        self.log.times.append(now - self.last)
        self.counter.consume(args.gradient_accumulation_steps)
        self.log.drawn.append((self.counter.rows, self.counter.tokens, self.counter.positions))
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.log.losses[state.global_step] = float(logs["loss"])
            if logs.get("grad_norm") is not None:
                self.log.grad_norms[state.global_step] = float(logs["grad_norm"])


def train_options(workload: Workload, device: Optional[str], dtype: Optional[str], output: Path,
                  nproc: int = 1, master_port: int = 29500) -> TrainOptions:
    """The training options the workload amounts to: every step logged, no checkpoint written."""
    return TrainOptions(
        model=Path(workload.shape), data=Path("."), output=output, method=workload.method, device=device, dtype=dtype,
        impl=workload.impl, packing=workload.packing, pack_length=workload.pack_length,
        pre_seq_len=workload.pre_seq_len, lora_rank=workload.lora_rank, lora_dropout=0.0,
        quantization_bit=workload.quantization_bit,
        deepspeed="zero2" if get_method(workload.method).distributed_optimizer else None, lr=workload.learning_rate,
        batch_size=workload.batch_size, grad_accum=workload.grad_accum, max_steps=workload.total_steps,
        logging_steps=1, save_steps=workload.total_steps + 1, seed=workload.seed, padding=workload.padding,
        gradient_checkpointing=workload.gradient_checkpointing, nproc=nproc, master_port=master_port,
    )


def run_bench(workload: Workload, backend: Backend, dtype_name: Optional[str],
              peak_tflops: Optional[float]) -> Optional[dict[str, Any]]:
    """Run the workload in this process (one rank, or alone); rank 0 returns the measurements."""
    rank, local_rank, world_size = world()
    start_process(backend)
    backend.set_device(local_rank)
    backend.reset_peak_memory(local_rank)
    dtype = resolve_dtype(dtype_name, backend)
    shape = workload.config()
    with tempfile.TemporaryDirectory(prefix="glm-portable-bench-") as scratch:
        options = train_options(workload, backend.name, dtype_name, Path(scratch))
        args = training_arguments(options, backend, dtype, world_size)
        backend.seed(workload.seed)
        model = build_model(options, backend, dtype, local_rank, shape=None if workload.from_directory else shape)
        rows = synthetic_rows(workload, shape)
        if workload.packing:
            length = workload.packed_length
            data = Dataset.from_dict(pack_rows(rows["input_ids"], rows["labels"], length))
            collator = PackedCollator(0, length)
        else:
            data, collator = Dataset.from_dict(rows), TrainCollator(0, workload.padding, workload.seq_length)
        log, counter = StepLog(), BatchCounter(collator)
        trainer = GlmTrainer(model=model, args=args, train_dataset=data, method=get_method(workload.method),
                             data_collator=counter, callbacks=[StepTimer(backend, log, counter)],
                             **token_weighted_loss(model))
        trainer.train()
        kernels = kernels_name(model)
    peaks = gather_from_ranks(backend.memory_stats(local_rank).peak_allocated, world_size)
    leave_process_group()
    if rank != 0:
        return None
    trainable, total = trainable_parameters(options, shape)
    prefix = get_method(options.method).prefix_length(options)
    return _results(workload, backend, dtype, log, peaks, trainable, total, shape, prefix, peak_tflops, kernels)


def _results(workload: Workload, backend: Backend, dtype: torch.dtype, log: StepLog, peaks: list[int],
             trainable: int, total: int, shape: ChatGLMConfig, prefix: int,
             peak_tflops: Optional[float], kernels: Optional[str]) -> dict[str, Any]:
    measured = log.times[workload.warmup:]
    seconds = sum(measured)
    first, last = log.drawn[workload.warmup], log.drawn[-1]
    samples, tokens, positions = ((b - a) * workload.world_size for a, b in zip(first, last))
    per_token = training_flops_per_token(shape, get_method(workload.method), workload.seq_length, prefix, trainable)
    device_name = (backend.device_names() or [""])[0]
    peak = backend.peak_tflops(dtype, device_name, peak_tflops)
    tokens_per_device = tokens / seconds / workload.world_size
    quantiles = statistics.quantiles(measured, n=10, method="inclusive") if len(measured) > 1 else measured * 9
    return {
        "device": {"backend": backend.name, "name": device_name, "count": workload.world_size, "kernels": kernels},
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": {"total": total, "trainable": trainable},
        "results": {
            "samples_per_s": round(samples / seconds, 4),
            "tokens_per_s": round(tokens / seconds, 2),
            "tokens_per_s_per_device": round(tokens_per_device, 2),
            "padding_fraction": round(1 - tokens / positions, 4) if positions else None,
            "step_time_s": {"p50": round(statistics.median(measured), 6), "p90": round(quantiles[8], 6),
                            "mean": round(seconds / len(measured), 6)},
            "measured_steps": len(measured),
            "flops_per_token": per_token,
            "peak_tflops": peak,
            "mfu": None if peak is None else mfu(per_token, tokens_per_device, peak),
            "peak_memory_bytes": peaks,
            "losses": [log.losses.get(step) for step in range(1, workload.total_steps + 1)],
            "grad_norms": [log.grad_norms.get(step) for step in range(1, workload.total_steps + 1)],
        },
    }


def _thudm_style(options: BenchOptions, backend: Backend, dtype_name: Optional[str]) -> dict[str, Any]:
    """The same rows trained THUDM's way, measured first: the directory's own model code (patched) and batches padded
    to source + target."""
    check_remote_dir(Path(options.shape))
    thudm = Workload(**{spec.name: getattr(options, spec.name) for spec in fields(Workload)})
    thudm.impl, thudm.padding, thudm.packing, thudm.pack_length = "remote", "fixed", False, None
    measured = run_bench(thudm, backend, dtype_name, options.peak_tflops)
    return {"workload": thudm.as_record(), "results": measured["results"]}


def bench(options: BenchOptions, backend: Backend) -> Optional[dict]:
    """Measure the workload and write the record to ``options.out``: in this process, or, for several
    processes and DeepSpeed, in ``nproc`` launched processes of the same benchmark whose rank 0 writes it.

    Returns the record, or None in launched ranks other than 0.
    """
    workload, dtype_name, out, nproc = options, options.dtype, Path(options.out), options.nproc
    if out.exists() and not options.overwrite:
        raise UserError(f"{out}: exists (use --overwrite to replace it)")
    dtype = resolve_dtype(dtype_name, backend)
    distributed = get_method(workload.method).distributed_optimizer
    if distributed and backend.deepspeed_dtype(dtype) != dtype:
        trained = str(backend.deepspeed_dtype(dtype)).removeprefix("torch.")
        raise UserError(f"--dtype {dtype_name} with --method full on {backend.name}: DeepSpeed trains in {trained} "
                        f"there, so the record would misstate its dtype; use --dtype {trained} or a ptuning / lora "
                        "workload")
    workload.world_size = nproc
    if (nproc > 1 or distributed) and not is_launched_child():
        command = ["bench", *to_argv(options, leave_out=LAUNCH_FIELDS)]
        code = launch(train_options(workload, backend.name, dtype_name, out, nproc, options.master_port), backend,
                      command)
        if code != 0:
            raise TrainingStopped(f"the benchmark processes failed (exit code {code}); see their output above")
        return read_json_object(out)
    workload.world_size = world()[2]
    thudm = _thudm_style(options, backend, dtype_name) if options.compare_thudm else None
    measured = run_bench(workload, backend, dtype_name, options.peak_tflops)
    if measured is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    record = build_record(options.name, workload, measured, patches=list(APPLIED.names))
    if thudm is not None:
        record["thudm_style"] = thudm
        record["results"]["ratio_to_thudm_style"] = {
            key: round(measured["results"][key] / thudm["results"][key], 3) for key in ("samples_per_s", "tokens_per_s")}
    write_json_object(out, record)
    return record
