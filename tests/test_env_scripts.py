import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source(script: str, extra_env: dict, tail: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "ASCEND_", "GLM_PORTABLE", "DS_"))}
    env.update(extra_env)
    return subprocess.run(
        ["bash", "-c", f"source {ROOT / script} && {tail}"], capture_output=True, text=True, env=env, timeout=60
    )


def test_npu_sh_fails_clearly_without_cann(tmp_path):
    result = _source("env/npu.sh", {"HOME": str(tmp_path), "ASCEND_TOOLKIT_HOME": str(tmp_path / "none")}, "true")
    assert result.returncode != 0
    assert "CANN not found" in result.stderr


def test_npu_sh_sources_cann_and_exports_defaults_keeping_user_values(tmp_path):
    toolkit = tmp_path / "toolkit"
    toolkit.mkdir()
    (toolkit / "set_env.sh").write_text("export CANN_LOADED=yes\n")
    result = _source(
        "env/npu.sh",
        {"HOME": str(tmp_path), "ASCEND_TOOLKIT_HOME": str(toolkit), "HCCL_CONNECT_TIMEOUT": "900"},
        'echo "$CANN_LOADED $HCCL_CONNECT_TIMEOUT $HCCL_WHITELIST_DISABLE $DS_ACCELERATOR $GLM_PORTABLE_DEVICE"',
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "yes 900 1 npu npu"
    assert "HCCL_CONNECT_TIMEOUT=900 (kept)" in result.stdout
