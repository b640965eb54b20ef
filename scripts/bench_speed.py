"""Training throughput of the batching paths against THUDM's way, measured in one run.

    python scripts/bench_speed.py --model DIR [--method ptuning] [--rounds 3] [--device cpu]

DIR is a model directory carrying its own modeling code (config.json ``auto_map``), so that THUDM's way
can run on it: that code (patched) with every batch padded to source + target. The other variants
are glm-portable's native model on the same seeded rows of varied length: padded to source + target
(fixed, the NPU's default), padded to each batch's longest row (dynamic), and packed (``--packing``,
``--pack-length``) by the backend's own packed-row attention, and again by the dense block mask
(``packed-mask``) and by the portable reference, a row at a time (``packed-rows``). They alternate
round after round so the machine's noise hits all alike; the medians, their ratios to THUDM's way and
to fixed padding, the padding fractions and the kernels each ran go to stdout as JSON (and ``--out``).

On a GPU: ``--model DIR --device cuda --batch-size 16 --pre-seq-len 128`` on a chatglm2-6b-shaped
directory, ``--method lora`` for LoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any, Optional

from bench_rounds import add_workload_arguments, alternate, emit

from glm_portable.backends import Backend, Kernels, select_backend
from glm_portable.backends.kernels import reference_varlen_attention
from glm_portable.backends.varlen import PackedAttentionFn

VARIANTS = {
    "thudm": {"impl": "remote", "padding": "fixed"},
    "fixed": {"padding": "fixed"},
    "dynamic": {"padding": "dynamic"},
    "packed": {"packing": True},
    "packed-mask": {"packing": True},
    "packed-rows": {"packing": True},
}
# packed variants that replace the backend's packed-row kernel: None = the dense block mask
PACKED_KERNELS = {"packed-mask": (None, "block mask"), "packed-rows": (reference_varlen_attention, "a row at a time")}


def with_packed_attention(backend: Backend, packed_attention: Optional[PackedAttentionFn], label: str) -> Backend:
    """``backend`` whose kernels attend within packed rows by ``packed_attention`` instead of its own choice."""
    class Replaced(type(backend)):  # type: ignore[misc,valid-type]
        def kernels(self, dtype=None) -> Kernels:
            kernels = super().kernels(dtype)
            return dataclasses.replace(kernels, name=f"{kernels.name}, packed rows by {label}",
                                       packed_attention=packed_attention)

    return Replaced()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a model directory with its own code")
    add_workload_arguments(parser, batch_size=16, pre_seq_len=128)
    parser.add_argument("--pack-length", type=int, default=None, help="default: 2 × (source + target)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = parser.parse_args()
    backend = select_backend(args.device).backend
    pack_length = args.pack_length or 2 * (args.source_length + args.target_length)
    variants = {}
    for name in (name for name in args.variants.split(",") if name):
        variants[name] = {"varied_lengths": True, **VARIANTS[name]}
        if variants[name].get("packing"):
            variants[name]["pack_length"] = pack_length
    runs = alternate(args, str(args.model), variants, backend,
                     {name: with_packed_attention(backend, *PACKED_KERNELS[name]) for name in PACKED_KERNELS})
    summary: dict[str, Any] = {}
    for name, measured in runs.items():
        results = [m["results"] for m in measured]
        summary[name] = {key: statistics.median(r[key] for r in results) for key in ("samples_per_s", "tokens_per_s")}
        summary[name]["padding_fraction"] = results[0]["padding_fraction"]
        summary[name]["peak_memory_bytes"] = max(max(r["peak_memory_bytes"]) for r in results)
        summary[name]["mfu"] = results[0]["mfu"]
        summary[name]["kernels"] = measured[0]["device"]["kernels"]
    for reference in ("thudm", "fixed"):
        if reference in summary:
            for name in summary:
                summary[name][f"ratio_to_{reference}"] = round(
                    summary[name]["samples_per_s"] / summary[reference]["samples_per_s"], 3)
    emit({"device": backend.name, "model": args.model.name, "method": args.method, "batch_size": args.batch_size,
          "lengths": [args.source_length, args.target_length], "pre_seq_len": args.pre_seq_len,
          "pack_length": pack_length, "steps": args.steps, "rounds": args.rounds, "variants": summary}, args.out)


if __name__ == "__main__":
    main()
