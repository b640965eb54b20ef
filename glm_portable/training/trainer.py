"""One training process: transformers' Trainer with the method's checkpoints, exact resume and our outputs.

The Trainer brings gradient accumulation, loss scaling, DDP (gloo / nccl / hccl), and checkpoints
with optimizer, scheduler, RNG and data position; this module decides what a checkpoint holds
(only what the method trains), marks complete checkpoints, and writes the run's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import pickle
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from glm_portable import __version__
from glm_portable.atomic import write_text_atomic
from glm_portable.backends import Backend
from glm_portable.data import TrainCollator, check_compatible, load_preprocessed, template_for
from glm_portable.data.packing import PackedCollator, pack_rows
from glm_portable.versions import library_versions
from glm_portable.errors import GlmPortableError, NothingToDo, TrainingStopped, UserError
from glm_portable.jsonfile import read_json_object, strict_json, write_json_object
from glm_portable.locking import exclusive
from glm_portable.modeling import load_tokenizer, resolve_dtype
from glm_portable.modeling.config import is_first_generation
from glm_portable.modeling.model import causal_lm_loss
from glm_portable.patches import APPLIED
from glm_portable.process import start_process

from .deepspeed_config import build_deepspeed_config
from .methods import Method, build_model, get_method
from .nonfinite import NonFiniteWatch
from .options import TrainOptions
from .run_dir import (IDENTITY_KEYS, METRICS, RESULTS, RUN_JSON, checkpoint_step, complete_checkpoints, mark_complete,
                      plot_loss, prepare_run_dir, rotate_checkpoints, truncate_metrics)

THUDM_RESULT_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch")
ALL_RESULTS, TRAINER_STATE = "all_results.json", "trainer_state.json"  # where THUDM's scripts leave them


class BatchCounter:
    """Wraps a collator to count rows (a packed sequence holds several), real tokens and computed positions of the
    batches the steps consumed: the data loader fetches ahead, so a batch counts when its step ends (``consume``)."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collator = collator
        self.pending: deque[tuple[int, int, int]] = deque()
        self.rows = self.tokens = self.positions = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(items)
        rows = sum(item["position_ids"].count(0) if "position_ids" in item else 1 for item in items)
        self.pending.append((rows, sum(len(item["input_ids"]) for item in items), batch["input_ids"].numel()))
        return batch

    def consume(self, batches: int) -> None:
        for _ in range(min(batches, len(self.pending))):
            rows, tokens, positions = self.pending.popleft()
            self.rows, self.tokens, self.positions = self.rows + rows, self.tokens + tokens, self.positions + positions


class GlmTrainer(Trainer):
    """Checkpoints hold only what the method trains; complete ones are marked; non-finite losses are caught."""

    def __init__(self, *args, method: Method, base_dir: Optional[Path] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.base_dir = base_dir
        self.nonfinite: Optional[tuple[int, str]] = None  # (step, what became non-finite)
        self.watch = NonFiniteWatch()

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if not self.args.should_save:
            return  # under DeepSpeed every rank gets here; one writer per checkpoint
        self.method.save(self.accelerator.unwrap_model(self.model), Path(output_dir or self.args.output_dir),
                         state_dict, self.base_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        self.method.load(model or self.model, Path(resume_from_checkpoint))

    def _save_checkpoint(self, model, trial) -> None:
        """Save only trained tensors that are all finite, mark the checkpoint COMPLETE (with its files'
        checksums) once every rank has written its part; otherwise stop the run, keeping the last good one."""
        bad = next((name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()),
                   None)
        if bad is not None:
            if self.nonfinite is None:
                self.nonfinite = (self.state.global_step, f"the trained parameter {bad} became non-finite")
            self.control.should_training_stop = True
            return
        keep, self.args.save_total_limit = self.args.save_total_limit, None  # rotation waits for COMPLETE
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
            if keep:
                rotate_checkpoints(Path(self.args.output_dir), keep)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """A non-finite loss or gradient norm stops the run (the update it made is not kept). Read from the device
        only where it matters, at steps that log or save and at the last one, so that no step waits for the host."""
        self.watch.observe_grad_norm(grad_norm, self.state.global_step, self.args.device)
        control = self.control
        if control.should_log or control.should_save or self.state.global_step >= self.state.max_steps:
            found = self.watch.verdict(self.args.device, self.args.world_size)
            if found is not None and self.nonfinite is None:
                self.nonfinite = found
        if self.nonfinite is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_log = False
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.watch.observe_loss(loss, self.state.global_step + 1)
        return loss


class RunCallback(TrainerCallback):
    """metrics.jsonl lines (step, loss, lr, grad_norm, samples/s, tokens/s): samples are rows, tokens real ones, as
    the steps consumed them."""

    def __init__(self, run_dir: Path, counter: BatchCounter, world_size: int) -> None:
        self.run_dir = run_dir
        self.counter = counter
        self.world_size = world_size
        self.last_time = time.perf_counter()
        self.last_rows = self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_rows, self.last_tokens = time.perf_counter(), self.counter.rows, self.counter.tokens

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.consume(args.gradient_accumulation_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        samples = (self.counter.rows - self.last_rows) * self.world_size
        tokens = (self.counter.tokens - self.last_tokens) * self.world_size
        row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
               "grad_norm": logs.get("grad_norm"), "samples_per_s": round(samples / elapsed, 3),
               "tokens_per_s": round(tokens / elapsed, 1), "epoch": logs.get("epoch")}
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(strict_json(row) + "\n")
        self.last_time, self.last_rows, self.last_tokens = now, self.counter.rows, self.counter.tokens


def logits_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
    """The native model's loss, computed from another model's logits."""
    return causal_lm_loss(outputs["logits"], labels, num_items_in_batch)


def kernels_name(model: torch.nn.Module) -> Optional[str]:
    """Which kernels a native model runs (its backend's choice for the dtype), for run and bench records;
    None for a directory's own code."""
    kernels = getattr(model, "kernels", None)
    return kernels.name if kernels is not None else None


def token_weighted_loss(model: torch.nn.Module) -> dict[str, Any]:
    """The Trainer arguments that weigh every labelled token of an accumulation window equally.

    The native model takes ``num_items_in_batch`` itself; a model directory's own code does not, and
    the Trainer would then average micro-batches equally, so its loss is computed from its logits.
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(inner.forward).parameters.values())
    if accepts or "compute_loss_func" not in inspect.signature(Trainer.__init__).parameters:
        return {}
    return {"compute_loss_func": logits_loss}


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment; (0, 0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_identity(options: TrainOptions) -> dict[str, Any]:
    """The options that make two runs the same run (an output dir holding another is refused)."""
    return {k: v for k, v in options.as_dict().items() if k in IDENTITY_KEYS}


def _length_grouping(wanted: bool) -> dict[str, Any]:
    """transformers' length-grouped sampler: ``train_sampling_strategy`` since 5.x, ``group_by_length`` before."""
    if not wanted:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def training_arguments(options: TrainOptions, backend: Backend, dtype: torch.dtype, world_size: int) -> TrainingArguments:
    accelerated = backend.is_accelerator
    extra: dict[str, Any] = {}
    if options.deepspeed:
        extra["deepspeed"] = build_deepspeed_config(options.deepspeed, backend.deepspeed_dtype(dtype), options.offload,
                                                    options.deepspeed_config)
    if options.gradient_checkpointing:
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.compile:
        if backend.compile_backend is None:
            raise UserError(f"--compile: torch.compile is not offered on {backend.name} (its graph compiler is not "
                            "inductor); train without --compile")
        extra.update(torch_compile=True, torch_compile_backend=backend.compile_backend)
    return TrainingArguments(
        output_dir=str(options.output), per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.lr, max_steps=options.max_steps,
        warmup_steps=options.warmup_steps, logging_steps=options.logging_steps, save_steps=options.save_steps,
        save_total_limit=options.save_total_limit, seed=options.seed, data_seed=options.seed,
        bf16=accelerated and dtype == torch.bfloat16, fp16=accelerated and backend.needs_loss_scaling(dtype),
        use_cpu=not accelerated, report_to=[], remove_unused_columns=False, logging_nan_inf_filter=False,
        lr_scheduler_type="linear", weight_decay=0.0, dataloader_num_workers=0, average_tokens_across_devices=False,
        ddp_backend=backend.dist_backend if world_size > 1 else None, ddp_find_unused_parameters=False,
        disable_tqdm=not os.isatty(2), **_length_grouping(options.group_by_length), **extra,
    )


def training_batches(options: TrainOptions, dataset: Any, tokenizer: Any, manifest: dict[str, Any], padding: str
                     ) -> tuple[Any, Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]]:
    """The rows the Trainer draws and the collator that makes batches of them: padded rows, or (``--packing``)
    sequences of whole rows, ``fixed_length`` tokens each."""
    length = manifest["limits"]["fixed_length"]
    if padding != "packed":
        return dataset, TrainCollator(tokenizer.pad_token_id, padding, length)
    if is_first_generation(read_json_object(Path(options.model) / "config.json")):
        raise UserError("--packing: ChatGLM-6B's 2-D positions and prefix-LM attention are not packed; train it "
                        "without --packing")
    pack_length = options.pack_length or length
    if pack_length < length:
        raise UserError(f"--pack-length {pack_length}: the data's rows reach {length} tokens "
                        f"({options.data}/manifest.json); give at least that")
    packed = pack_rows(dataset["input_ids"], dataset["labels"], pack_length)
    return Dataset.from_dict(packed), PackedCollator(tokenizer.pad_token_id, pack_length)


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: torch.nn.Module


def run_training(options: TrainOptions, backend: Backend, selection_reason: str) -> TrainResult:
    """Train in this process (one rank of a launched group, or alone); returns THUDM's results and the model."""
    rank, local_rank, world_size = world()
    start_process(backend)
    backend.set_device(local_rank)
    dtype = resolve_dtype(options.dtype, backend)
    tokenizer = load_tokenizer(options.model)
    template = template_for(tokenizer)
    manifest = check_compatible(options.data, tokenizer, template.name, options.model)
    dataset = load_preprocessed(options.data, "train")
    identity = run_identity(options)
    args = training_arguments(options, backend, dtype, world_size)
    args.device  # sets up the process group, which the choice of checkpoint is shared over
    with contextlib.ExitStack() as held:  # rank 0 holds the run directory's lock throughout
        resume, refusal = None, None
        if rank == 0:
            try:
                held.enter_context(exclusive(options.output, "this training run"))
                resume = prepare_run_dir(options.output, identity, options.resume, options.overwrite, world_size,
                                         options.max_steps)
            except (UserError, NothingToDo) as exc:
                refusal = exc
        if world_size > 1:
            resume, refusal = _broadcast_decision(resume, refusal)
        if refusal is not None:
            leave_process_group()
            raise refusal
        options.output.mkdir(parents=True, exist_ok=True)

        backend.seed(options.seed)
        model = build_model(options, backend, dtype, local_rank)
        padding = "packed" if options.packing else options.padding or backend.default_padding()
        rows = len(dataset)
        dataset, batches = training_batches(options, dataset, tokenizer, manifest, padding)
        collator = BatchCounter(batches)
        callback = RunCallback(options.output, collator, world_size)
        trainer = GlmTrainer(model=model, args=args,
                             train_dataset=dataset, data_collator=collator, callbacks=[callback], method=get_method(options.method),
                             base_dir=options.model, **token_weighted_loss(model))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if rank == 0:
            truncate_metrics(options.output, checkpoint_step(resume) if resume is not None else 0)
            write_json_object(options.output / RUN_JSON, {
                "glm_portable_version": __version__, "identity": identity, "options": options.as_dict(),
                "backend": {"device": backend.name, "reason": selection_reason, "names": backend.device_names(),
                            "dtype": str(dtype).removeprefix("torch."), "loss_scaling": backend.needs_loss_scaling(dtype),
                            "dist_backend": backend.dist_backend,
                            "kernels": kernels_name(model)},
                "world_size": world_size, "padding": padding, "trainable_parameters": trainable,
                "data": {"path": str(options.data), "template": manifest["template"], "rows": rows,
                         "packed_sequences": len(dataset) if options.packing else None,
                         "tokenizer": manifest["tokenizer"]["fingerprint"]},
                "resumed_from": str(resume) if resume else None, "versions": library_versions(),
                "impl": options.impl, "patches": list(APPLIED.names),
            })
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{resume}: holds pickled objects that are not plain tensors, which are never loaded: "
                            f"{str(exc).splitlines()[0]}") from None
        if trainer.nonfinite is None and not (options.output / f"checkpoint-{trainer.state.global_step}").is_dir():
            trainer._save_checkpoint(trainer.model, None)
        if trainer.nonfinite is not None:
            step, what = trainer.nonfinite
            kept = complete_checkpoints(options.output)
            leave_process_group()
            raise TrainingStopped(f"{what} at step {step}; training stopped there. "
                                  f"Last good checkpoint: {kept[-1] if kept else 'none (no checkpoint was saved before it)'}")
        metrics: dict[str, Any] = {k: result.metrics.get(k) for k in THUDM_RESULT_KEYS}
        metrics["train_samples"] = rows
        if options.packing and metrics.get("train_samples_per_second"):
            # the Trainer counts packed sequences; THUDM's samples are rows
            metrics["train_rows_per_second"] = round(metrics["train_samples_per_second"] * rows / len(dataset), 3)
        metrics["peak_memory_bytes_per_rank"] = gather_from_ranks(backend.memory_stats(local_rank).peak_allocated, world_size)
        if rank == 0:
            for name in (RESULTS, ALL_RESULTS):
                write_json_object(options.output / name, metrics)
            write_text_atomic(options.output / TRAINER_STATE,
                              json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n")
            plot_loss(options.output)
        leave_process_group()
        return TrainResult(metrics, trainer.accelerator.unwrap_model(trainer.model))


def gather_from_ranks(value: Any, world_size: int) -> list[Any]:
    """``value`` from every rank, in rank order (CPU peak memory is per process, so each rank reports)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def leave_process_group() -> None:
    """Tear the group down while every rank is still alive; DeepSpeed's communicator aborts a process
    that exits with the group open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _broadcast_decision(resume: Optional[Path], refusal: Optional[GlmPortableError]
                        ) -> tuple[Optional[Path], Optional[GlmPortableError]]:
    """Every rank resumes from the checkpoint rank 0 chose, or stops as rank 0 stops (none waits alone)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return resume, refusal
    box = [(str(resume) if resume else None, type(refusal).__name__ if refusal else None, str(refusal or ""))]
    dist.broadcast_object_list(box, src=0)
    path, kind, message = box[0]
    stopped = {"NothingToDo": NothingToDo, "UserError": UserError}[kind](message) if kind else None
    return (Path(path) if path else None), stopped
