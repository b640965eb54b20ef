import os

import pytest
import torch

from glm_portable.backends import BackendUnavailable, get_backend, select_backend
from glm_portable.errors import UserError


@pytest.fixture(autouse=True)
def _no_env_device(monkeypatch):
    monkeypatch.delenv("GLM_PORTABLE_DEVICE", raising=False)


def test_auto_falls_back_to_cpu_and_says_why():
    if get_backend("cuda").is_available():
        pytest.skip("a GPU is present")
    selection = select_backend("auto")
    assert selection.backend.name == "cpu"
    assert "npu unavailable" in selection.reason and "cuda unavailable" in selection.reason


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("GLM_PORTABLE_DEVICE", "cpu")
    selection = select_backend(None)
    assert selection.backend.name == "cpu"
    assert "GLM_PORTABLE_DEVICE" in selection.reason


def test_flag_wins_over_environment(monkeypatch):
    monkeypatch.setenv("GLM_PORTABLE_DEVICE", "npu")
    assert select_backend("cpu").backend.name == "cpu"


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match="expected one of auto, cpu, cuda, npu"):
        select_backend("tpu")


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a CPU build of torch")
def test_cuda_request_on_cpu_build_explains_how_to_get_it():
    with pytest.raises(BackendUnavailable, match="not a CUDA build") as info:
        select_backend("cuda")
    assert "CUDA build of torch" in str(info.value)


def test_cpu_policy():
    cpu = get_backend("cpu")
    assert cpu.default_dtype() == torch.float32
    assert cpu.dist_backend == "gloo"
    assert cpu.device(3) == torch.device("cpu")
    assert cpu.child_env([0, 1]) == {"DS_ACCELERATOR": "cpu"}
    assert not cpu.needs_loss_scaling(torch.bfloat16)
    assert cpu.memory_stats().peak_allocated > 0
    assert (cpu.default_padding(), cpu.default_cache()) == ("dynamic", "dynamic")


def test_prepare_process_pins_the_deepspeed_accelerator(monkeypatch, fake_npu):
    """DeepSpeed would pick the NPU because torch_npu imports; the chosen backend decides instead."""
    monkeypatch.setenv("DS_ACCELERATOR", "npu")
    get_backend("cpu").prepare_process()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_cuda_child_environment_and_policy():
    cuda = get_backend("cuda")
    assert cuda.dist_backend == "nccl"
    assert cuda.child_env([2, 3]) == {"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert cuda.needs_loss_scaling(torch.float16)


def test_peak_tflops_table_override_and_unknown(monkeypatch):
    cuda = get_backend("cuda")
    assert cuda.peak_tflops(torch.bfloat16, device_name="NVIDIA H100 80GB HBM3") == 989.0
    assert cuda.peak_tflops(torch.bfloat16, device_name="Mystery GPU") is None
    assert cuda.peak_tflops(torch.bfloat16, device_name="Mystery GPU", override=123) == 123.0
    monkeypatch.setenv("GLM_PORTABLE_PEAK_TFLOPS", "77")
    assert cuda.peak_tflops(torch.bfloat16, device_name="Mystery GPU") == 77.0


def test_seed_makes_cpu_randomness_repeatable():
    cpu = get_backend("cpu")
    cpu.seed(7)
    a = torch.randn(4)
    cpu.seed(7)
    assert torch.equal(a, torch.randn(4))


@pytest.mark.gpu
@pytest.mark.skipif(not get_backend("cuda").is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_on_a_real_gpu():
    selection = select_backend("cuda")
    backend = selection.backend
    assert backend.device_count() >= 1
    assert backend.default_dtype() == (torch.bfloat16 if backend.supports_bf16() else torch.float16)
    x = torch.randn(4, 4, device=backend.device(0))
    backend.synchronize()
    assert backend.memory_stats(0).allocated > 0
    assert x.device.type == backend.name
