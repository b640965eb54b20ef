"""The entry layer: each command as a library function that takes its options and does the whole job.

Between the command line and the modules: choosing the backend, starting the process, deciding to
launch more processes (and with which options), resuming, and running in this process. ``cli.py``
parses, calls one of these and prints; a script or a notebook calls them the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from glm_portable.schema import to_argv, validate

if TYPE_CHECKING:  # the modules themselves are imported when called, so that `--help` stays fast
    from glm_portable.bench.options import BenchOptions
    from glm_portable.evaluation.options import EvalOptions
    from glm_portable.serving.options import ChatOptions
    from glm_portable.training.options import TrainOptions

Announce = Callable[[str], None]


def _quiet(_: str) -> None:
    """No announcement."""


@dataclass
class TrainOutcome:
    """``plan`` for a dry run; ``exit_code`` when launched processes did the work; ``metrics`` (THUDM's
    train results) when this process trained, ``rank`` telling which one it was."""

    plan: Optional[dict[str, Any]] = None
    exit_code: Optional[int] = None
    metrics: Optional[dict[str, Any]] = None
    rank: int = 0


def train(options: "TrainOptions", announce: Announce = _quiet) -> TrainOutcome:
    """Fine-tune as ``options`` say: a dry run's plan, launched processes (several cards or nodes, DeepSpeed),
    or training in this process (alone, or as one rank of a launch)."""
    from glm_portable.backends import select_backend
    from glm_portable.training.launcher import LAUNCH_FIELDS, dry_run_plan, is_launched_child, launch, plan
    from glm_portable.training.run_dir import refuse_finished, resolve_resume
    from glm_portable.training.trainer import run_identity, run_training

    validate(options)
    if options.dry_run:
        return TrainOutcome(plan=dry_run_plan(options))
    selection = select_backend(options.device)
    if (options.nproc > 1 or options.nnodes > 1 or options.deepspeed) and not is_launched_child():
        plan(options, selection.backend, selection.reason)
        checkpoint = resolve_resume(options.output, run_identity(options), options.resume, options.overwrite,
                                    options.nproc * options.nnodes, verify=False)  # rank 0 verifies the checksums
        refuse_finished(options.output, checkpoint, options.max_steps)
        announce(f"launching {options.nproc} × {options.nnodes} processes on {selection.backend.name}")
        return TrainOutcome(exit_code=launch(options, selection.backend,
                                             ["train", *to_argv(options, leave_out=LAUNCH_FIELDS)]))
    result = run_training(options, selection.backend, selection.reason)
    return TrainOutcome(metrics=result.metrics, rank=int(os.environ.get("RANK", 0)))


def evaluate(options: "EvalOptions", on_start: Optional[Callable[[int], None]] = None,
             on_batch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Generate answers for the held-out prompts on the selected backend and score them (THUDM's metrics)."""
    from glm_portable.backends import select_backend
    from glm_portable.evaluation import evaluate as run
    from glm_portable.process import start_process

    validate(options)
    selection = select_backend(options.device)
    start_process(selection.backend)
    return run(options, selection.backend, on_start=on_start, on_batch=on_batch)


@dataclass
class ChatSession:
    """A loaded model to talk to: ``turns(text, history)`` yields (answer so far, updated history)."""

    description: str
    turns: Callable[[str, list], Iterator[tuple[str, list]]]


def open_chat(options: "ChatOptions") -> ChatSession:
    """Load the model (and checkpoint) for chatting: glm-portable's own streaming chat, or with ``--impl remote``
    the directory's own ``stream_chat``, as its README runs it."""
    from glm_portable.backends import select_backend
    from glm_portable.evaluation import load_for_inference
    from glm_portable.modeling import GenerationSettings, load_tokenizer, stream_chat
    from glm_portable.modeling.remote import load_remote_tokenizer
    from glm_portable.process import start_process

    validate(options)
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, do_sample=not options.greedy,
                                  top_p=options.top_p, temperature=options.temperature)
    settings.check()
    selection = select_backend(options.device)
    start_process(selection.backend)
    loaded = load_for_inference(options.model, options.checkpoint, selection.backend, options.dtype, options.impl,
                                options.quantization_bit)
    if options.impl == "remote":
        tokenizer = load_remote_tokenizer(options.model, selection.backend)

        def remote_turns(text: str, history: list) -> Iterator[tuple[str, list]]:
            yield from loaded.stream_chat(tokenizer, text, history, max_new_tokens=options.max_new_tokens,
                                          do_sample=settings.do_sample, top_p=settings.top_p,
                                          temperature=settings.temperature)

        return ChatSession(f"{type(tokenizer).__name__} (remote) on {selection.backend.name}", remote_turns)
    native = load_tokenizer(options.model)

    def native_turns(text: str, history: list) -> Iterator[tuple[str, list]]:
        yield from stream_chat(loaded, native, text, history, settings)

    return ChatSession(f"{native.family} (native) on {selection.backend.name}", native_turns)


def bench(options: "BenchOptions") -> Optional[dict[str, Any]]:
    """Measure a workload and write its record; None in launched ranks other than 0."""
    from glm_portable.backends import select_backend
    from glm_portable.bench.runner import bench as run

    validate(options)
    return run(options, select_backend(options.device).backend)
