"""Training throughput of the native implementation against a model directory's own code (`--impl remote`),
measured in one run: the two alternate round after round, so that the shared machine's noise hits both.

    python scripts/bench_impls.py --model DIR --data PREPROCESSED --rounds 3 --steps 20

DIR must carry its own modeling code (config.json ``auto_map``). Each round trains P-Tuning v2 for
``--steps`` steps with the Trainer (fresh output directories under a temporary folder) and reads
the Trainer's samples/s; prints one JSON line with each implementation's median and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from glm_portable.backends import select_backend
from glm_portable.training.options import TrainOptions
from glm_portable.training.trainer import run_training

IMPLS = ("native", "remote")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="preprocessed for --model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    selection = select_backend(args.device)
    samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for impl in IMPLS:
                options = TrainOptions(model=args.model, data=args.data, output=Path(scratch) / f"{impl}-{round_index}",
                                       impl=impl, pre_seq_len=args.pre_seq_len, batch_size=args.batch_size,
                                       grad_accum=1, max_steps=args.steps, logging_steps=args.steps,
                                       save_steps=args.steps)
                result = run_training(options, selection.backend, selection.reason)
                samples[impl].append(float(result.metrics["train_samples_per_second"]))
    medians = {impl: statistics.median(values) for impl, values in samples.items()}
    print(json.dumps({"device": selection.backend.name, "samples_per_s": samples, "median": medians,
                      "native_over_remote": round(medians["native"] / medians["remote"], 3)}))


if __name__ == "__main__":
    main()
