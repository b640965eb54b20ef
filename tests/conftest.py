"""Shared fixtures: the torch_npu double and the tiny model every test builds on."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture
def fake_npu(monkeypatch):
    """Make the torch_npu double importable and report 8 Atlas A2 devices for one test.

    The double stays imported afterwards (torch cannot unregister a device type), so it is reset
    to report no devices: later tests see "installed but no NPU visible" and auto picks the CPU.
    """
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delenv("GLM_PORTABLE_DEVICE", raising=False)
    module = importlib.import_module("torch_npu")
    state = module.STATE
    state.device_count, state.soc_name = 8, "Ascend910B3"
    state.calls.clear()
    state.compile_mode.clear()
    yield module
    state.device_count, state.soc_name = 0, "Ascend910B3"
    sys.path[:] = [p for p in sys.path if p != str(FAKES)]
