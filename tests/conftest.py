"""Shared fixtures: the torch_npu double and the tiny model every test builds on."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture
def fake_npu(monkeypatch):
    """Make the torch_npu double importable and report 8 Atlas A2 devices for one test, with torch
    reporting a CPU build as real torch_npu needs (the double runs beside a CUDA build too).

    The double stays imported afterwards (torch cannot unregister a device type), so it is reset
    to report no devices: later tests see "installed but no NPU visible" and auto picks the CPU.
    """
    import torch

    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delenv("GLM_PORTABLE_DEVICE", raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)  # as fakes/sitecustomize.py does
    module = importlib.import_module("torch_npu")
    state = module.STATE
    state.device_count, state.soc_name = 8, "Ascend910B3"
    state.calls.clear()
    state.compile_mode.clear()
    yield module
    state.device_count, state.soc_name = 0, "Ascend910B3"
    sys.path[:] = [p for p in sys.path if p != str(FAKES)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer ChatGLM3-family tiny model directory, built once per test session."""
    from glm_portable.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny3", family="chatglm3", seed=0)


@pytest.fixture(scope="session")
def tiny2_dir(tmp_path_factory):
    """A ChatGLM2-family tiny model with 3 weight shards and 8 heads over 2 key/value groups."""
    from glm_portable.modeling.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny2", family="chatglm2", heads=8, kv_groups=2, seed=1, shards=3
    )


def free_port() -> str:
    """A TCP port nothing listens on right now, for a launcher's --master-port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
