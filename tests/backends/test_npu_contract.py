"""Contract tests of the NPU backend against the torch_npu double (documented API, computed on CPU)."""

import pytest
import torch

from glm_portable.backends import get_backend, select_backend
from glm_portable.backends.kernels import eager_attention, reference_rms_norm


def test_auto_prefers_npu_when_present(fake_npu):
    selection = select_backend("auto")
    assert selection.backend.name == "npu"
    assert selection.reason == "auto: npu is available"


def test_npu_is_unavailable_with_reason_when_no_device_visible(fake_npu, monkeypatch):
    fake_npu.STATE.device_count = 0
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "9")
    status = get_backend("npu").availability()
    assert not status.available
    assert "ASCEND_RT_VISIBLE_DEVICES=9" in status.reason
    assert select_backend("auto").backend.name != "npu"


def test_child_environment_uses_ascend_variables_and_hccl_defaults(fake_npu, monkeypatch):
    monkeypatch.delenv("HCCL_CONNECT_TIMEOUT", raising=False)
    npu = select_backend("npu").backend
    env = npu.child_env([0, 1, 2, 3])
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert env["DS_ACCELERATOR"] == "npu"
    assert env["HCCL_CONNECT_TIMEOUT"] == "7200"
    assert npu.dist_backend == "hccl"
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "600")
    assert npu.child_env([0])["HCCL_CONNECT_TIMEOUT"] == "600"


def test_prepare_process_turns_jit_compile_off_unless_asked(fake_npu, monkeypatch):
    npu = get_backend("npu")
    monkeypatch.delenv("GLM_PORTABLE_NPU_JIT_COMPILE", raising=False)
    npu.prepare_process()
    assert fake_npu.STATE.compile_mode == {"jit_compile": False}
    monkeypatch.setenv("GLM_PORTABLE_NPU_JIT_COMPILE", "1")
    npu.prepare_process()
    assert fake_npu.STATE.compile_mode == {"jit_compile": True}


def test_dtype_policy_bf16_on_a2_fp16_with_loss_scaling_on_910a(fake_npu):
    npu = get_backend("npu")
    assert npu.default_dtype() == torch.bfloat16
    fake_npu.STATE.soc_name = "Ascend910A"
    assert npu.default_dtype() == torch.float16
    assert npu.needs_loss_scaling(npu.default_dtype())
    assert npu.peak_tflops(torch.float16) == 256.0
    assert (npu.default_padding(), npu.default_cache()) == ("fixed", "static")  # graph mode compiles per shape


def test_seed_reaches_the_device_generators(fake_npu):
    get_backend("npu").seed(1234)
    assert fake_npu.STATE.seeds and set(fake_npu.STATE.seeds) == {1234}


def test_device_for_local_rank_is_an_npu_device(fake_npu):
    device = get_backend("npu").device(3)
    assert (device.type, device.index) == ("npu", 3)


@pytest.mark.parametrize("with_mask,kv_len", [(False, 6), (False, 9), (True, 6)], ids=["causal", "prefix", "mask"])
def test_fused_attention_on_a2_equals_reference(fake_npu, with_mask, kv_len):
    kernels = get_backend("npu").kernels(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=g).bfloat16()
    k = torch.randn(2, 2, kv_len, 16, generator=g).bfloat16()
    v = torch.randn(2, 2, kv_len, 16, generator=g).bfloat16()
    mask = None
    if with_mask:
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
        mask[0, :, :, :2] = False
        mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    out = kernels.attention(q, k, v, mask, mask is None, 0.25)
    expected = eager_attention(q, k, v, mask, mask is None, 0.25)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    # causal without a mask is the kernel's right-down causal mode: no dense mask is built
    assert fake_npu.STATE.calls == [("npu_fusion_attention", "BNSD", 0 if with_mask else 3)]


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_packed_rows_go_to_the_tnd_layout_and_equal_the_block_mask(fake_npu, prefix_len):
    from glm_portable.backends.kernels import reference_varlen_attention
    from glm_portable.backends.varlen import packed_rows

    kernels = get_backend("npu").kernels(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batch, seq = 2, 8
    q = torch.randn(batch, 4, seq, 16, generator=g).bfloat16()
    k = torch.randn(batch, 2, prefix_len + seq, 16, generator=g).bfloat16()
    v = torch.randn(batch, 2, prefix_len + seq, 16, generator=g).bfloat16()
    cu_seqlens = torch.tensor([0, 3, 5, 8, 12, 16], dtype=torch.int32)  # rows 3+2+3 and 4+4
    rows = packed_rows(cu_seqlens, batch, seq, prefix_len)
    out = kernels.packed_attention(q, k, v, rows, 0.25)
    torch.testing.assert_close(out, eager_attention(q, k, v, rows.block_mask(), False, 0.25), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, reference_varlen_attention(q, k, v, rows, 0.25), atol=2e-2, rtol=2e-2)
    assert fake_npu.STATE.calls == [("npu_fusion_attention", "TND", 3)]


def test_910a_never_calls_fused_attention_but_uses_rms_norm(fake_npu):
    fake_npu.STATE.soc_name = "Ascend910A"
    kernels = get_backend("npu").kernels(torch.float16)
    q = torch.randn(1, 2, 3, 8).half()
    k = torch.randn(1, 1, 3, 8).half()
    kernels.attention(q.float(), k.float(), k.float(), None, True, 0.3)
    x, w = torch.randn(2, 8).half(), torch.rand(8).half()
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))
    assert [c[0] for c in fake_npu.STATE.calls] == ["npu_rms_norm"]


def test_fp32_on_npu_keeps_the_portable_attention(fake_npu):
    assert "fusion" not in get_backend("npu").kernels(torch.float32).name


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND"])
def test_double_layouts_agree_with_bnsd(fake_npu, layout):
    """The double itself: every documented layout gives the BNSD result."""
    q = torch.randn(2, 4, 5, 8).half()
    k = torch.randn(2, 2, 5, 8).half()
    base = fake_npu.npu_fusion_attention(q, k, k, 4, "BNSD", scale=0.2)[0]
    convert = {
        "BSH": lambda t: t.transpose(1, 2).flatten(2),
        "SBH": lambda t: t.permute(2, 0, 1, 3).flatten(2),
        "BSND": lambda t: t.transpose(1, 2),
    }[layout]
    out = fake_npu.npu_fusion_attention(convert(q), convert(k), convert(k), 4, layout, scale=0.2)[0]
    torch.testing.assert_close(out, convert(base))


def test_the_double_holds_the_causal_mode_and_tnd_to_their_documented_inputs(fake_npu):
    q = torch.randn(6, 4, 16).half()
    with pytest.raises(RuntimeError, match="2048x2048"):
        fake_npu.npu_fusion_attention(q, q, q, 4, "TND", atten_mask=torch.ones(6, 6, dtype=torch.bool).triu(1),
                                      actual_seq_qlen=[6], actual_seq_kvlen=[6], sparse_mode=3)
    mask = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    with pytest.raises(RuntimeError, match="host lists of int"):
        fake_npu.npu_fusion_attention(q, q, q, 4, "TND", atten_mask=mask, actual_seq_qlen=torch.tensor([6]),
                                      actual_seq_kvlen=[6], sparse_mode=3)
    with pytest.raises(RuntimeError, match="total tokens"):
        fake_npu.npu_fusion_attention(q, q, q, 4, "TND", atten_mask=mask, actual_seq_qlen=[2, 5],
                                      actual_seq_kvlen=[2, 5], sparse_mode=3)
