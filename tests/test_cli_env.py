import json
import os
import subprocess
import sys
from pathlib import Path

FAKES = Path(__file__).parent / "fakes"


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "GLM_PORTABLE_DEVICE"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "glm_portable.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_env_json_lists_every_backend_with_reasons():
    result = _run("env", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["backends"]) == {"npu", "cuda", "cpu"}
    assert report["backends"]["cpu"]["available"]
    for name, entry in report["backends"].items():
        assert entry["available"] or entry["reason"], name
    assert report["selected"]["reason"]
    assert report["versions"]["torch"]


def test_env_table_names_selected_device():
    result = _run("env", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "selected device: cpu" in result.stdout
    assert "transformers" in result.stdout


def test_unavailable_npu_exits_2_with_install_hint_and_no_traceback():
    result = _run("env", env_extra={"GLM_PORTABLE_DEVICE": "npu"})
    assert result.returncode == 2
    assert "torch_npu" in result.stderr and "env/npu.sh" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_npu_through_the_double_is_selected_and_torch_npu_never_imported_for_cpu():
    code = (
        "import sys, torch_npu; torch_npu.STATE.device_count = 2;"
        "from glm_portable.backends import select_backend;"
        "print(select_backend('npu').backend.child_env([0, 1])['ASCEND_RT_VISIBLE_DEVICES'])"
    )
    env = {**os.environ, "PYTHONPATH": str(FAKES)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0,1"
    code = (
        "import sys; from glm_portable.backends import select_backend;"
        "select_backend('cpu');"
        "from glm_portable.backends.cuda import CudaBackend; CudaBackend().availability();"
        "print('torch_npu' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_env_warns_when_torch_threads_exceed_the_free_cores(monkeypatch):
    import torch

    from glm_portable.environment import cpu_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    report = cpu_threads()
    assert report["free_cores"] == 2 and "OMP_NUM_THREADS=2" in report["warning"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_threads()["warning"] is None
