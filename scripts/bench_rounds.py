"""What the benchmark scripts share: workload flags, variants run in alternating rounds, the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from glm_portable.backends import Backend
from glm_portable.bench.options import Workload
from glm_portable.bench.runner import run_bench
from glm_portable.schema import validate


def add_workload_arguments(parser: argparse.ArgumentParser, batch_size: int, pre_seq_len: int) -> None:
    parser.add_argument("--method", default="ptuning", choices=("ptuning", "lora"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--target-length", type=int, default=128)
    parser.add_argument("--pre-seq-len", type=int, default=pre_seq_len)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def alternate(args: argparse.Namespace, shape: str, variants: dict[str, dict[str, Any]], backend: Backend,
              backends: Optional[dict[str, Backend]] = None) -> dict[str, list[dict[str, Any]]]:
    """Each variant's run measurements (``run_bench``), the variants taking turns round after round, so that a
    shared machine's noise hits all of them alike. ``backends`` gives some variants a backend of their own."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fields in variants.items():
            workload = Workload(shape=shape, method=args.method, batch_size=args.batch_size,
                                source_length=args.source_length, target_length=args.target_length,
                                pre_seq_len=args.pre_seq_len, steps=args.steps, warmup=args.warmup, **fields)
            validate(workload)
            runs[name].append(run_bench(workload, (backends or {}).get(name, backend), args.dtype, None))
            print(f"{name}: {runs[name][-1]['results']['samples_per_s']} samples/s", file=sys.stderr)
    return runs


def emit(report: dict[str, Any], out: Optional[Path]) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
