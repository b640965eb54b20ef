"""A real `glm-portable serve` process on a free local port, shared by the serving tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from glm_portable.backends import get_backend
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.training.options import TrainOptions
from glm_portable.training.trainer import run_training
from tests.patches.conftest import make_remote_dir

COLORS = ["红色", "白色", "黑色", "蓝色"]
ENV = {**{k: v for k, v in os.environ.items() if k != "GLM_PORTABLE_API_KEY"}, "GLM_PORTABLE_DEVICE": "cpu"}
START_TIMEOUT_S = 120


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: list[str]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def _pump(stream, lines: list[str], ready: threading.Event) -> None:
    for line in stream:
        lines.append(line)
        if line.startswith("serving "):
            ready.set()
    ready.set()


@contextmanager
def running_server(model: Path, *args: str, env: dict | None = None) -> Iterator[Server]:
    """Start ``serve --port 0``, wait for its ready line, yield; stop it at the end if still running."""
    process = subprocess.Popen([sys.executable, "-m", "glm_portable.cli", "serve", "--model", str(model),
                                "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**ENV, **(env or {})})
    lines: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_pump, args=(process.stdout, lines, ready), daemon=True).start()
    try:
        if not ready.wait(START_TIMEOUT_S) or process.poll() is not None:
            raise AssertionError("serve did not start:\n" + "".join(lines))
        url = re.search(r" at (http://\S+) ", next(l for l in lines if l.startswith("serving "))).group(1)
        yield Server(url, process, lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def served(tiny_dir) -> Iterator[Server]:
    """The tiny ChatGLM3 model, room for long generations, a batch window wide enough for concurrent tests."""
    with running_server(tiny_dir, "--max-new-tokens", "4000", "--batch-wait-ms", "100") as server:
        yield server


@pytest.fixture(scope="session")
def remote_base(tiny_dir, tmp_path_factory):
    """The tiny model with upstream-structured code of its own, so that the export is checked with that code too."""
    return make_remote_dir(tiny_dir, tmp_path_factory.mktemp("export-base") / "tiny3")


@pytest.fixture(scope="session")
def runs(remote_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    rows = [{"content": f"类型#裙*颜色#{c}", "summary": f"这条{c}的裙子简约大方。"} for c in COLORS] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=remote_base, train_file=root / "train.jsonl", out=root / "data", num_shards=1))
    made = {}
    for method, lr in (("lora", 5e-2), ("ptuning", 0.3)):
        options = TrainOptions(model=remote_base, data=root / "data", output=root / method, method=method, lr=lr,
                               pre_seq_len=8, prefix_projection=False, batch_size=4, grad_accum=1, max_steps=8,
                               logging_steps=4, save_steps=8)
        run_training(options, get_backend("cpu"), "test")
        made[method] = root / method
    return made
