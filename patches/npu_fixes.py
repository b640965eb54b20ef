"""NPU fixes for ChatGLM's remote model code (docs/npu.md): no TorchScript, and attention / RMSNorm
through the backend's kernels (fused attention takes an explicit boolean mask)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import ModuleType

import torch

from .registry import Context, Decision, Patch, Replacements
from .remote_classes import own

JIT_FLAGS = ("_jit_set_profiling_mode", "_jit_set_profiling_executor", "_jit_override_can_fuse_on_cpu",
             "_jit_override_can_fuse_on_gpu")


def _jit_needed(ctx: Context, source: Path) -> Decision:
    text = source.read_text(encoding="utf-8", errors="replace") if source.is_file() else ""
    if "torch.jit.script" not in text and "_jit_" not in text:
        return Decision(False, "no torch.jit.script or jit flags in the module", present=False)
    if ctx.backend != "npu":
        return Decision(False, f"TorchScript runs on {ctx.backend}")
    return Decision(True, "torch.jit.script and the torch._C jit flags fail on NPU; "
                          "suppressed while the module is imported")


def _no_jit(ctx: Context, source: Path) -> Replacements:
    def script(obj=None, *args, **kwargs):
        """The function itself, uncompiled (also as a decorator factory)."""
        return obj if obj is not None else (lambda fn: fn)

    out: Replacements = [(torch.jit, "script", script)]
    for flag in JIT_FLAGS:
        if hasattr(torch._C, flag):
            def ignored(*args, **kwargs):
                return None

            out.append((torch._C, flag, ignored))
    return out


NPU_NO_JIT = Patch(
    name="npu-no-torchscript", target="torch.jit.script, torch._C._jit_* (during the remote import)",
    symptom="TorchScript errors on NPU at import or in the rotary function", needed=_jit_needed,
    replacements=_no_jit, kind="import")


def _attention_classes(module: ModuleType) -> list[type]:
    wanted = ["self", "query_layer", "key_layer", "value_layer", "attention_mask"]
    return [cls for cls in vars(module).values() if isinstance(cls, type) and cls.__module__ == module.__name__
            and own(cls, "forward") is not None and list(inspect.signature(own(cls, "forward")).parameters) == wanted]


def _attention_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in _attention_classes(module)]
    if not classes:
        return Decision(False, "no CoreAttention(query_layer, key_layer, value_layer, attention_mask)", present=False)
    if ctx.backend != "npu":
        return Decision(False, f"torch's attention serves {ctx.backend}")
    return Decision(True, f"{', '.join(classes)} through the backend's attention ({ctx.kernels.name}) with an "
                          "explicit boolean causal mask")


def _attention(ctx: Context, module: ModuleType) -> Replacements:
    attention = ctx.kernels.attention

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        """Sequence-first [s, b, heads, d] in and [s, b, heads * d] out, as upstream; True in the
        upstream mask means blocked, the kernels' mask means allowed."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        allowed = None if attention_mask is None else ~attention_mask
        context = attention(q, k, v, allowed, True, 1.0 / math.sqrt(q.shape[-1]))
        context = context.permute(2, 0, 1, 3)
        return context.reshape(*context.shape[:2], -1)

    return [(cls, "forward", forward) for cls in _attention_classes(module)]


NPU_ATTENTION = Patch(
    name="npu-attention-kernel", target="CoreAttention.forward", symptom="slow or failing attention on NPU "
    "(npu_scaled_masked_softmax shape limits at decode time)", needed=_attention_needed, replacements=_attention)


def _norm_classes(module: ModuleType) -> list[type]:
    return [cls for cls in vars(module).values() if isinstance(cls, type) and cls.__module__ == module.__name__
            and cls.__name__ == "RMSNorm" and own(cls, "forward") is not None]


def _norm_needed(ctx: Context, module: ModuleType) -> Decision:
    if not _norm_classes(module):
        return Decision(False, "no RMSNorm class", present=False)
    if ctx.backend != "npu":
        return Decision(False, f"the module's RMSNorm serves {ctx.backend}")
    return Decision(True, f"RMSNorm through the backend's kernel ({ctx.kernels.name})")


def _norm(ctx: Context, module: ModuleType) -> Replacements:
    rms_norm = ctx.kernels.rms_norm

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.eps)

    return [(cls, "forward", forward) for cls in _norm_classes(module)]


NPU_RMS_NORM = Patch(name="npu-rms-norm-kernel", target="RMSNorm.forward", symptom="unfused RMSNorm on NPU",
                     needed=_norm_needed, replacements=_norm)

NPU_PATCHES = (NPU_NO_JIT, NPU_ATTENTION, NPU_RMS_NORM)
