"""What a quantized frozen base (``--quantization-bit 4|8``) saves and costs, measured in one run.

    python scripts/bench_quantization.py --shape DIR_OR_SHAPE [--method ptuning] [--rounds 3] [--device cpu]

Prints one JSON object:
- ``bytes``: the base's weights in bf16 and at 8 and 4 bits for the chatglm2-6b and chatglm-6b shapes (meta
  tensors, nothing allocated), and each ratio to bf16;
- ``kernel``: the backend's 8-bit matmul vs the reference on one 4096 → 4608 layer, by rows and dtype;
- ``logits`` (with ``--logits-model DIR``): the largest |logit| difference, quantized vs unquantized (fp32);
- ``training``: the benchmark workload run unquantized (in the run's dtype) and at 8 and 4 bits in alternating
  rounds (the shared machine's noise hits all three): median samples/s, its ratio to unquantized, the peak
  device memory, and the mean relative difference of the loss curve to unquantized (same seed, same data).
On a GPU, ``--shape chatglm2-6b --device cuda --batch-size 16`` gives the 6B figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
from bench_rounds import add_workload_arguments, alternate, emit

from glm_portable.backends import select_backend
from glm_portable.backends.kernels import REFERENCE_KERNELS
from glm_portable.backends.quantized import quantize_weight
from glm_portable.modeling import ChatGLM1Config, ChatGLMConfig, load_model, load_tokenizer, new_model
from glm_portable.modeling.quantization import quantize_block_linears, state_bytes

BITS = (None, 8, 4)
UNQUANTIZED = "unquantized"


def label(bits: Optional[int]) -> str:
    return str(bits) if bits else UNQUANTIZED


def weight_bytes(config: ChatGLMConfig, bits: Optional[int]) -> int:
    with torch.device("meta"):
        model = new_model(config)
        if bits:
            quantize_block_linears(model, bits)
    return state_bytes(model.to(torch.bfloat16))


def bytes_table() -> dict[str, Any]:
    table = {}
    for name, config in (("chatglm2-6b", ChatGLMConfig()), ("chatglm-6b", ChatGLM1Config())):
        sizes = {str(bits or "bf16"): weight_bytes(config, bits) for bits in BITS}
        table[name] = {"bytes": sizes, "ratio_to_bf16": {k: round(v / sizes["bf16"], 4) for k, v in sizes.items()}}
    return table


def logit_differences(model_dir: Path) -> dict[str, float]:
    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer.pad([tokenizer.encode(text) for text in ("类型#裙*颜色#红色*风格#简约", "你好，请介绍一下你自己")])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        full = load_model(model_dir, dtype="float32", device="cpu")(**batch).logits[real]
        result = {"max_abs_logit": round(full.abs().max().item(), 6)}
        for bits in (8, 4):
            quantized = load_model(model_dir, dtype="float32", device="cpu", quantization_bit=bits)(**batch).logits[real]
            result[f"max_abs_difference_{bits}"] = round((quantized - full).abs().max().item(), 6)
    return result


def kernel_times(device: Optional[str], rows: list[int], repeats: int = 5) -> list[dict[str, Any]]:
    """The backend's 8-bit quantized matmul against the reference (dequantize, then matmul) on ChatGLM2-6B's
    q/k/v layer (4096 → 4608), by input rows and dtype: what the weight-only kernel's row limits rest on."""
    backend = select_backend(device).backend
    kernels = backend.kernels(torch.bfloat16)
    q, scale = quantize_weight(torch.randn(4608, 4096), 8)
    q, scale = q.to(backend.device()), scale.to(backend.device())
    timings = []
    for dtype in (torch.bfloat16, torch.float32):
        for count in rows:
            x = torch.randn(count, 4096, dtype=dtype, device=backend.device())
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": count}
            for name, matmul in (("reference_ms", REFERENCE_KERNELS.quantized_matmul),
                                 ("backend_ms", kernels.quantized_matmul)):
                matmul(x, q, scale.to(dtype), 8)
                backend.synchronize()
                started = time.perf_counter()
                for _ in range(repeats):
                    matmul(x, q, scale.to(dtype), 8)
                backend.synchronize()
                row[name] = round((time.perf_counter() - started) / repeats * 1000, 3)
            timings.append(row)
    return timings


def training(args: argparse.Namespace) -> dict[str, Any]:
    backend = select_backend(args.device).backend
    runs = alternate(args, str(args.shape), {label(bits): {"quantization_bit": bits} for bits in BITS}, backend)
    base = runs[UNQUANTIZED][0]["results"]["losses"]
    speed = {bits: statistics.median(r["results"]["samples_per_s"] for r in results) for bits, results in runs.items()}
    summary = {}
    for bits, results in runs.items():
        losses = results[0]["results"]["losses"]
        summary[bits] = {
            "samples_per_s": speed[bits], "ratio_to_unquantized": round(speed[bits] / speed[UNQUANTIZED], 3),
            "peak_memory_bytes": max(max(r["results"]["peak_memory_bytes"]) for r in results),
            "loss_mean_relative_difference": round(statistics.fmean(abs(a - b) / b for a, b in zip(losses, base)), 6),
            "losses": losses,
        }
    workload = {"shape": str(args.shape), "method": args.method, "batch_size": args.batch_size,
                "lengths": [args.source_length, args.target_length], "steps": args.steps, "rounds": args.rounds}
    return {"device": backend.name, "dtype": runs[UNQUANTIZED][0]["dtype"], "workload": workload, "by_bits": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help="a bench shape (tiny, 1b, chatglm2-6b, ...) or model directory")
    add_workload_arguments(parser, batch_size=4, pre_seq_len=16)
    parser.add_argument("--logits-model", type=Path, default=None, help="a model directory for the logit difference")
    parser.add_argument("--kernel-rows", default="1,16,256", help="rows of the kernel timing (comma-separated)")
    args = parser.parse_args()
    report: dict[str, Any] = {"bytes": bytes_table()}
    report["kernel"] = kernel_times(args.device, [int(r) for r in args.kernel_rows.split(",") if r])
    if args.logits_model is not None:
        report["logits"] = logit_differences(args.logits_model)
    report["training"] = training(args)
    emit(report, args.out)


if __name__ == "__main__":
    main()
