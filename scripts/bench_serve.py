"""Throughput of `glm-portable serve` with one client against many concurrent ones, in one run.

    python scripts/bench_serve.py                       # a tiny model built on the fly, CPU
    python scripts/bench_serve.py --model DIR --device cuda --clients 16 --out record.json

Starts a real server on a free local port, warms it up, then measures the same number of
greedy completions (distinct prompts, fixed max_tokens) sent one after another by a single
client (to a server with no batch window, its best setting for one client), and sent by N
clients at once (to a server with a 20 ms window). Prints one JSON object (completions/s, tokens/s, the
server's batch count, and the N-client / 1-client ratios) and writes it with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from glm_portable.jsonfile import write_json_object


def start_server(model: Path, device: str, max_batch: int, max_tokens: int, wait_ms: float, *extra: str
                 ) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "glm_portable.cli", "serve", "--model", str(model), "--port", "0", "--device", device,
         "--max-batch-size", str(max_batch), "--max-new-tokens", str(max_tokens), "--batch-wait-ms", str(wait_ms),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("serving "):
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, re.search(r" at (http://\S+) ", line).group(1)
    raise SystemExit("the server did not start")


def complete(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens}
    response = client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def measure(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    batches_before = httpx.get(f"{url}/health").json()["batches"]
    with httpx.Client() as client, ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(lambda p: complete(client, url, p, max_tokens), prompts))
        seconds = time.perf_counter() - started
    return {"clients": clients, "completions": len(prompts), "completion_tokens": tokens,
            "seconds": round(seconds, 3), "completions_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "batches": httpx.get(f"{url}/health").json()["batches"] - batches_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny ChatGLM3 built now)")
    parser.add_argument("--device", default=os.environ.get("GLM_PORTABLE_DEVICE", "auto"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="completions measured in each phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=20,
                        help="the many-client server's batch window (the one-client server waits 0 ms)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from glm_portable.modeling.tiny import make_tiny_model

            model = make_tiny_model(Path(scratch) / "tiny", family="chatglm3", seed=0)
        prompts = [f"类型#裙*颜色#{i}*风格#简约" for i in range(args.requests)]
        results = {}
        for clients, wait_ms in ((1, 0), (args.clients, args.batch_wait_ms)):
            process, url = start_server(model, args.device, args.clients, args.max_tokens, wait_ms)
            try:
                measure(url, prompts[: args.clients], clients, args.max_tokens)
                results[clients] = {**measure(url, prompts, clients, args.max_tokens), "batch_wait_ms": wait_ms}
            finally:
                process.terminate()
                process.wait(timeout=60)
    one, many = results[1], results[args.clients]
    record = {"model": str(args.model or "tiny (make-tiny-model --family chatglm3)"), "device": args.device,
              "max_tokens": args.max_tokens, "one_client": one, "many_clients": many,
              "ratio_completions_per_s": round(many["completions_per_s"] / one["completions_per_s"], 2),
              "ratio_tokens_per_s": round(many["tokens_per_s"] / one["tokens_per_s"], 2)}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_object(args.out, record)


if __name__ == "__main__":
    main()
