"""Bare forward+backward+AdamW throughput of the native model (no Trainer), to separate model speed
from the training loop that `glm-portable bench` measures.

    python scripts/bench_model_step.py --model DIR --batch-size 4 --seq-len 193
    python scripts/bench_model_step.py --shape chatglm2-6b --pre-seq-len 128 --batch-size 16 --seq-len 193 --dtype bfloat16

Prints one JSON line: device, dtype, tokens/s, samples/s, step time median, peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from glm_portable.backends import select_backend
from glm_portable.bench.options import SHAPE_NAMES, Workload
from glm_portable.modeling import load_model, random_model, resolve_dtype

def build(args, backend, dtype):
    if args.model:
        return load_model(args.model, dtype=dtype, device=backend, pre_seq_len=args.pre_seq_len)
    return random_model(Workload(shape=args.shape).config(), dtype=dtype, device=backend, pre_seq_len=args.pre_seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (e.g. from make-tiny-model)")
    parser.add_argument("--shape", choices=SHAPE_NAMES, help="random weights in this shape instead of --model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--pre-seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=193, help="THUDM: source 64 + target 128 + eos")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    if not (args.model or args.shape):
        parser.error("give --model or --shape")
    backend = select_backend(args.device).backend
    backend.prepare_process()
    dtype = resolve_dtype(args.dtype, backend)
    backend.seed(0)
    model = build(args, backend, dtype).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device = backend.device(0)
    vocab = model.config.padded_vocab_size
    ids = torch.randint(3, min(vocab, 60000), (args.batch_size, args.seq_len), device=device)
    times = []
    backend.reset_peak_memory(0)
    for step in range(args.warmup + args.steps):
        backend.synchronize()
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backend.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "device": backend.name, "device_name": backend.device_names()[0], "dtype": str(dtype).removeprefix("torch."),
        "model": args.model or args.shape, "pre_seq_len": args.pre_seq_len, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "trainable_params": sum(p.numel() for p in params),
        "step_time_median_s": round(median, 4), "samples_per_s": round(args.batch_size / median, 2),
        "tokens_per_s": round(args.batch_size * args.seq_len / median, 1),
        "peak_memory_gib": round(backend.memory_stats(0).peak_allocated / 2**30, 2), "last_loss": round(loss.item(), 4),
    }))


if __name__ == "__main__":
    main()
