"""The Ascend NPU backend: torch_npu (imported lazily and guarded), hccl, ASCEND_RT_VISIBLE_DEVICES.

torch_npu is never imported unless this backend is asked about, so the CUDA path never touches it.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from functools import lru_cache
from dataclasses import dataclass, field
from types import ModuleType
from typing import Mapping, Optional

import torch

from .base import Availability, Backend
from .kernels import Kernels, reference_rms_norm, sdpa_attention
from .quantized import npu_weight_quant_matmul, reference_quantized_matmul
from .varlen import PackedRows, from_varlen, to_varlen

CANN_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/ascend-toolkit",
              "/opt/Ascend/ascend-toolkit/latest")

JIT_COMPILE_ENV = "GLM_PORTABLE_NPU_JIT_COMPILE"

# What the Ascend recipe exports; a value the user already set always wins.
HCCL_DEFAULTS: dict[str, str] = {
    "HCCL_CONNECT_TIMEOUT": "7200",
    "HCCL_WHITELIST_DISABLE": "1",
    "TASK_QUEUE_ENABLE": "1",
    "ASCEND_GLOBAL_LOG_LEVEL": "3",
}

# 910A (Atlas training series) fp16 spec; 910B SKUs differ, so they are left to --peak-tflops.
NPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "910A": {"float16": 256.0},
}


def _import_torch_npu() -> tuple[Optional[ModuleType], str]:
    """Import torch_npu, turning every way it can fail into a reason instead of an exception."""
    if torch.backends.cuda.is_built():
        return None, f"torch_npu cannot load beside a CUDA build of torch ({torch.__version__}); use a separate environment"
    try:
        return importlib.import_module("torch_npu"), ""
    except ImportError as exc:
        if getattr(exc, "name", None) == "torch_npu":
            return None, "torch_npu is not installed"
        return None, f"torch_npu failed to import: {exc}"
    except (OSError, RuntimeError) as exc:
        return None, f"torch_npu failed to load (is CANN on the library path? `source env/npu.sh`): {exc}"


@dataclass
class NpuBackend(Backend):
    name: str = "npu"
    dist_backend: str = "hccl"
    visible_devices_var: str | None = "ASCEND_RT_VISIBLE_DEVICES"
    deepspeed_accelerator: str = "npu"
    install_hint: str = (
        "install torch_npu of the same version as torch on a CPU build of torch "
        "(`pip install -e '.[npu]'`, torch_npu X.Y.Z matching torch X.Y.Z), then `source env/npu.sh` to load CANN"
    )
    peak_tflops_table: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: NPU_PEAK_TFLOPS)
    static_shapes: bool = True  # graph mode compiles per input shape
    compile_backend: str | None = None  # torch.compile on Ascend goes through torchair, not inductor
    env_vars: tuple[str, ...] = ("ASCEND_RT_VISIBLE_DEVICES", "ASCEND_TOOLKIT_HOME", "TORCH_DEVICE_BACKEND_AUTOLOAD",
                                 "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "TASK_QUEUE_ENABLE",
                                 "GLM_PORTABLE_NPU_JIT_COMPILE")

    def toolkit_versions(self) -> dict[str, str | None]:
        """CANN's version from its install info file, when a toolkit is found (whether or not torch_npu loads)."""
        homes = [os.environ["ASCEND_TOOLKIT_HOME"]] if os.environ.get("ASCEND_TOOLKIT_HOME") else []
        for home in homes + list(CANN_HOMES):
            for info in glob.glob(os.path.join(home, "*", "ascend_toolkit_install.info")) + glob.glob(
                    os.path.join(home, "ascend_toolkit_install.info")):
                with open(info, encoding="utf-8", errors="replace") as f:
                    match = re.search(r"^version=(.+)$", f.read(), re.MULTILINE)
                if match:
                    return {"cann": match.group(1).strip()}
        return {"cann": None}

    def torch_npu(self) -> Optional[ModuleType]:
        module, _ = _import_torch_npu()
        return module

    def availability(self) -> Availability:
        module, reason = _import_torch_npu()
        if module is None:
            return Availability(False, reason)
        if not self.module().is_available() or self.module().device_count() == 0:
            visible = os.environ.get(self.visible_devices_var or "", "<unset>")
            return Availability(False, f"torch_npu is installed but no NPU is visible (ASCEND_RT_VISIBLE_DEVICES={visible})")
        return Availability(True)

    def supports_bf16(self) -> bool:
        """Atlas A2 (910B) has bf16; 910A does not and trains in fp16 with loss scaling."""
        return self.is_available() and bool(self.module().is_bf16_supported())

    def prepare_process(self) -> None:
        """Prebuilt binary kernels (jit_compile off) unless the user asks otherwise.

        Avoids the single-card ``embedding_dense_grad`` error and the slow operator compilation on 910A.
        """
        super().prepare_process()
        module = self.torch_npu()
        if module is None:
            return
        jit = os.environ.get(JIT_COMPILE_ENV, "0").strip().lower() in {"1", "true", "yes", "on"}
        module.npu.set_compile_mode(jit_compile=jit)
        for key, value in HCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)

    def child_env(self, devices: list[int] | None = None) -> dict[str, str]:
        env = super().child_env(devices)
        env.update({key: os.environ.get(key, value) for key, value in HCCL_DEFAULTS.items()})
        return env

    def kernels(self, dtype: torch.dtype | None = None) -> Kernels:
        """Fused attention (padded and packed rows) and the weight-only quantized matmul where the hardware has
        them (A2, half dtypes), npu_rms_norm everywhere."""
        module = self.torch_npu()
        if module is None:
            return super().kernels(dtype)
        fused = dtype in (torch.float16, torch.bfloat16) and self.supports_bf16()
        return Kernels(
            name="npu (fusion attention, rms_norm)" if fused else "npu (rms_norm)",
            attention=_npu_fusion_attention(module) if fused else sdpa_attention,
            rms_norm=_npu_rms_norm(module),
            quantized_matmul=npu_weight_quant_matmul(module) if fused else reference_quantized_matmul,
            packed_attention=_npu_varlen_attention(module) if fused else None,
            static_shapes=self.static_shapes,
        )


COMPRESSED_MASK_SIZE = 2048  # the causal sparse modes take this fixed mask whatever the sequence lengths
RIGHT_DOWN_CAUSAL = 3  # sparse_mode: query i of Sq sees keys up to i + Skv - Sq


@lru_cache(maxsize=8)
def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048x2048 upper-triangle mask (True = blocked) the causal sparse modes take, built once per device."""
    return torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def _npu_fusion_attention(module: ModuleType):
    def attention(q, k, v, mask, causal, scale):
        """npu_fusion_attention in BNSD layout (it takes grouped K/V as is). Causal attention without a mask is
        its right-down causal sparse mode, so no dense mask is built; a given mask is passed as True where
        *blocked*."""
        if mask is None and causal:
            extra = {"atten_mask": _compressed_causal_mask(q.device), "sparse_mode": RIGHT_DOWN_CAUSAL}
        else:
            extra = {"atten_mask": None if mask is None else ~mask, "sparse_mode": 0}
        return module.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", scale=scale, keep_prob=1.0, **extra)[0]

    return attention


def _npu_varlen_attention(module: ModuleType):
    def attention(q, k, v, rows: PackedRows, scale):
        """Packed rows in the TND layout, causal to each row's last key (right-down sparse mode); the rows'
        cumulative ends go to the kernel as host lists, read once per forward."""
        batch, heads, seq, _ = q.shape
        q_flat, k_flat, v_flat = to_varlen(q, k, v, rows)
        q_ends, k_ends = rows.host_ends()
        out = module.npu_fusion_attention(
            q_flat, k_flat, v_flat, heads, "TND", atten_mask=_compressed_causal_mask(q.device), scale=scale,
            keep_prob=1.0, actual_seq_qlen=q_ends, actual_seq_kvlen=k_ends, sparse_mode=RIGHT_DOWN_CAUSAL,
        )[0]
        return from_varlen(out, batch, seq)

    return attention


def _npu_rms_norm(module: ModuleType):
    def rms_norm(x, weight, eps):
        """npu_rms_norm computes in fp32 internally; fall back to the reference for mixed dtypes."""
        if weight.dtype != x.dtype:
            return reference_rms_norm(x, weight, eps)
        return module.npu_rms_norm(x, weight, epsilon=eps)[0]

    return rms_norm
