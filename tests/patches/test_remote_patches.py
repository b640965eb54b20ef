"""Each remote-code patch against our upstream-structured fixture: it fails without the patch on the
installed transformers and works with it; revert restores; applying twice changes nothing."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto import auto_factory

from glm_portable.backends.kernels import PORTABLE_KERNELS, Kernels
from glm_portable.errors import UserError
from glm_portable.patches import Context, remote_code_patched
from glm_portable.patches.generation_fixes import (GENERATION_DROPPED_MASK, GENERATION_EOS_TENSOR,
                                                   GENERATION_EXTRACT_PAST, GENERATION_LOGITS_WARPER,
                                                   GENERATION_TUPLE_CACHE)
from glm_portable.patches.model_fixes import (CONFIG_GENERATION_FIELDS, GRADIENT_CHECKPOINTING_ENABLE, MODEL_POST_INIT,
                                              PREFIX_TOKENS_ON_META, QUANTIZATION_CUDA_ONLY)
from glm_portable.patches.npu_fixes import NPU_ATTENTION, NPU_RMS_NORM
from glm_portable.patches.registry import MARK
from glm_portable.patches.tokenizer_fixes import (TOKENIZER_BATCH_ENCODE_PLUS, TOKENIZER_INIT_ORDER,
                                                  TOKENIZER_PAD_SIDE)

CPU = Context.current("cpu")
MODEL_PATCHES = [CONFIG_GENERATION_FIELDS, MODEL_POST_INIT, PREFIX_TOKENS_ON_META]
GENERATION = [GENERATION_TUPLE_CACHE, GENERATION_EXTRACT_PAST, GENERATION_DROPPED_MASK, GENERATION_LOGITS_WARPER,
              GENERATION_EOS_TENSOR]


class Fresh:
    """The fixture's modules, executed anew (no patch from an earlier test on them)."""

    def __init__(self, remote_dir):
        self.dir = remote_dir
        self.config_json = json.loads((remote_dir / "config.json").read_text())
        self.tok = self._load("tokenization_chatglm.ChatGLMTokenizer")
        self.cfg = self._load("configuration_chatglm.ChatGLMConfig")
        self.model = self._load("modeling_chatglm.ChatGLMForConditionalGeneration")

    def _load(self, reference):
        cls = get_class_from_dynamic_module(reference, str(self.dir), force_download=True)
        return sys.modules[cls.__module__]

    def module_of(self, patch):
        if patch in (TOKENIZER_INIT_ORDER, TOKENIZER_PAD_SIDE, TOKENIZER_BATCH_ENCODE_PLUS):
            return self.tok
        return self.cfg if patch is CONFIG_GENERATION_FIELDS else self.model

    def apply(self, *patches):
        """Those of ``patches`` the installed transformers needs."""
        for patch in patches:
            if patch.needed(CPU, self.module_of(patch)).needed:
                patch.apply(CPU, self.module_of(patch))

    def tokenizer(self):
        return self.tok.ChatGLMTokenizer(vocab_file=str(self.dir / "tokenizer.model"))

    def config(self, **changes):
        return self.cfg.ChatGLMConfig(**{**self.config_json, **changes})

    def pretrained(self, **changes):
        """Loaded as transformers loads checkpoints (meta-device construction on 5.x)."""
        return self.model.ChatGLMForConditionalGeneration.from_pretrained(str(self.dir), config=self.config(**changes))

    def generator(self, **changes):
        """Built as the Auto classes build remote models: with GenerationMixin added (breakage 13)."""
        torch.manual_seed(0)
        with_mixin = getattr(auto_factory, "add_generation_mixin_to_remote_model", lambda cls: cls)
        model = with_mixin(self.model.ChatGLMForConditionalGeneration)(self.config(**changes))
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(std=0.02)
        return model.eval()


@pytest.fixture
def fresh(remote_dir):
    modules = Fresh(remote_dir)
    yield modules
    for patch in (TOKENIZER_INIT_ORDER, TOKENIZER_PAD_SIDE, TOKENIZER_BATCH_ENCODE_PLUS, *MODEL_PATCHES,
                  GRADIENT_CHECKPOINTING_ENABLE, QUANTIZATION_CUDA_ONLY, *GENERATION, NPU_ATTENTION, NPU_RMS_NORM):
        for module in (modules.tok, modules.cfg, modules.model):
            patch.revert(module)


PROMPT = torch.tensor([[1001, 1003, 1006, 546, 13, 511, 1007]])


def _generate(model):
    return model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=3, do_sample=False)


def _stream(model, **settings):
    return list(model.stream_generate(PROMPT, max_new_tokens=3, do_sample=False, **settings))[-1]


SCENARIOS = {
    "tokenizer-init-order": ([], lambda f: f.tokenizer()),
    "tokenizer-pad-padding-side": ([TOKENIZER_INIT_ORDER],
                                   lambda f: f.tokenizer().pad({"input_ids": [[5, 6, 7], [8]]}, padding=True)),
    "tokenizer-batch-encode-plus": ([TOKENIZER_INIT_ORDER, TOKENIZER_PAD_SIDE],
                                    lambda f: f.tokenizer().build_chat_input("你好")),
    "config-generation-fields": ([], lambda f: f.config().use_cache),
    "model-post-init": ([CONFIG_GENERATION_FIELDS], lambda f: f.pretrained()),
    "prefix-tokens-on-meta": ([CONFIG_GENERATION_FIELDS, MODEL_POST_INIT],
                              lambda f: f.pretrained(pre_seq_len=4).transformer.get_prompt(1, torch.device("cpu"))),
    "generation-tuple-cache": (MODEL_PATCHES + [GENERATION_EXTRACT_PAST, GENERATION_DROPPED_MASK],
                               lambda f: _generate(f.generator(pre_seq_len=4))),
    "generation-extract-past": (MODEL_PATCHES + [GENERATION_TUPLE_CACHE, GENERATION_DROPPED_MASK],
                                lambda f: _generate(f.generator())),
    "generation-dropped-attention-mask": (MODEL_PATCHES + [GENERATION_TUPLE_CACHE, GENERATION_EXTRACT_PAST],
                                          lambda f: _generate(f.generator())),
    "generation-logits-warper": (MODEL_PATCHES + [GENERATION_TUPLE_CACHE, GENERATION_EXTRACT_PAST, GENERATION_EOS_TENSOR],
                                 lambda f: _stream(f.generator())),
    "generation-eos-token-tensor": (MODEL_PATCHES + [GENERATION_TUPLE_CACHE, GENERATION_EXTRACT_PAST,
                                                     GENERATION_LOGITS_WARPER],
                                    lambda f: _stream(f.generator(), bad_words_ids=[[5]])),
}
# What each breakage looks like without its patch (the patches' own `symptom` text, as the installed stack raises it).
SYMPTOMS = {
    "tokenizer-init-order": (Exception, r"'property' object cannot be interpreted as an integer|"
                                        r"has no attribute '(sp_)?tokenizer'"),
    "tokenizer-pad-padding-side": (TypeError, r"_pad\(\) got an unexpected keyword argument 'padding_side'"),
    "tokenizer-batch-encode-plus": (AttributeError, r"has no attribute '?batch_encode_plus"),
    "config-generation-fields": (AttributeError, r"has no attribute 'use_cache'"),
    "model-post-init": (AttributeError, r"has no attribute 'all_tied_weights_keys'"),
    "prefix-tokens-on-meta": (NotImplementedError, r"meta tensor"),
    "generation-tuple-cache": (Exception, r"num_hidden_layers|tuple|index"),
    "generation-extract-past": (AttributeError, r"_extract_past_from_model_output|standardize_cache_format|"
                                                r"'str' object has no attribute 'shape'"),
    "generation-dropped-attention-mask": (AttributeError, r"'NoneType' object has no attribute 'new_ones'"),
    "generation-logits-warper": (Exception, r"_get_logits_warper|required positional argument: 'device'"),
    "generation-eos-token-tensor": (AttributeError, r"_eos_token_tensor"),
}
PATCHES = {p.name: p for p in [TOKENIZER_INIT_ORDER, TOKENIZER_PAD_SIDE, TOKENIZER_BATCH_ENCODE_PLUS, *MODEL_PATCHES,
                               *GENERATION]}


def _attributes(patch, fresh):
    module = fresh.module_of(patch)
    return {(owner, name): vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
            for owner, name, _ in patch.replacements(CPU, module)}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_patch_fixes_its_breakage_reverts_and_is_idempotent(name, fresh):
    """Needed on the installed transformers: fails without, works with. Not needed: works without."""
    patch, (prerequisites, scenario) = PATCHES[name], SCENARIOS[name]
    fresh.apply(*prerequisites)
    if not patch.needed(CPU, fresh.module_of(patch)).needed:
        scenario(fresh)
        return
    before = _attributes(patch, fresh)
    error, message = SYMPTOMS[name]
    with pytest.raises(error, match=message):
        scenario(fresh)
    fresh.apply(patch)
    scenario(fresh)
    after = _attributes(patch, fresh)
    assert not patch.apply(CPU, fresh.module_of(patch)), "a second apply changed something"
    assert _attributes(patch, fresh) == after
    patch.revert(fresh.module_of(patch))
    assert _attributes(patch, fresh) == before
    with pytest.raises(error, match=message):
        scenario(fresh)


def test_the_installed_transformers_needs_what_its_version_says(fresh):
    """On 5.x every listed breakage applies; on the 4.40 of the second CI environment only the first."""
    expected_from = {"tokenizer-init-order": "4.34", "tokenizer-pad-padding-side": "4.45",
                     "tokenizer-batch-encode-plus": "5.0", "config-generation-fields": "5.0", "model-post-init": "5.0",
                     "prefix-tokens-on-meta": "5.0", "generation-tuple-cache": "5.0", "generation-extract-past": "4.42",
                     "generation-logits-warper": "4.42", "generation-eos-token-tensor": "4.43"}
    decided = {name: PATCHES[name].needed(CPU, fresh.module_of(PATCHES[name])).needed for name in expected_from}
    assert decided == {name: CPU.at_least("transformers", version) for name, version in expected_from.items()}


def test_patches_that_the_installed_transformers_does_not_need_are_gated_by_version(fresh):
    older = replace(CPU, versions={**CPU.versions, "transformers": "4.33.2"})
    assert not TOKENIZER_INIT_ORDER.needed(older, fresh.tok).needed
    assert not CONFIG_GENERATION_FIELDS.needed(older, fresh.cfg).needed
    assert not GENERATION_EXTRACT_PAST.needed(older, fresh.model).needed
    assert TOKENIZER_INIT_ORDER.needed(replace(older, versions={"transformers": "4.34.0"}), fresh.tok).needed
    assert GRADIENT_CHECKPOINTING_ENABLE.needed(replace(older, versions={"transformers": "4.35.1"}), fresh.model).needed
    assert not GRADIENT_CHECKPOINTING_ENABLE.needed(CPU, fresh.model).needed


def test_gradient_checkpointing_accepts_the_4_35_keyword(fresh):
    fresh.apply(CONFIG_GENERATION_FIELDS, MODEL_POST_INIT)
    model = fresh.generator()
    with pytest.raises(TypeError, match="enable"):
        model._set_gradient_checkpointing(enable=True)
    at_4_35 = replace(CPU, versions={"transformers": "4.35.1"})
    GRADIENT_CHECKPOINTING_ENABLE.apply(at_4_35, fresh.model)
    model._set_gradient_checkpointing(enable=True)
    assert model.transformer.encoder.gradient_checkpointing
    GRADIENT_CHECKPOINTING_ENABLE.revert(fresh.model)


def test_quantization_is_refused_off_cuda_with_a_clear_message(fresh):
    fresh.apply(CONFIG_GENERATION_FIELDS, MODEL_POST_INIT)
    with pytest.raises(RuntimeError, match="cpm_kernels"):
        fresh.generator(quantization_bit=4)
    fresh.apply(QUANTIZATION_CUDA_ONLY)
    with pytest.raises(UserError, match="int4 quantization .* cannot run on cpu"):
        fresh.generator(quantization_bit=4)
    assert not QUANTIZATION_CUDA_ONLY.needed(replace(CPU, backend="cuda"), fresh.model).needed


def test_npu_import_runs_without_torchscript_and_leaves_torch_unchanged(remote_dir):
    script, flag = torch.jit.script, torch._C._jit_set_profiling_mode
    npu = Context.current("npu", PORTABLE_KERNELS)
    with remote_code_patched(npu) as report:
        cls = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", str(remote_dir))
    module = sys.modules[cls.__module__]
    assert not isinstance(module.apply_rotary_pos_emb, torch.jit.ScriptFunction)
    assert "npu-no-torchscript (modeling_chatglm.py)" in report.applied
    assert torch.jit.script is script and torch._C._jit_set_profiling_mode is flag
    for patch in (NPU_ATTENTION, NPU_RMS_NORM):
        patch.revert(module)
    with remote_code_patched(CPU):
        cls = get_class_from_dynamic_module("modeling_chatglm.ChatGLMForConditionalGeneration", str(remote_dir),
                                            force_download=True)
    assert isinstance(sys.modules[cls.__module__].apply_rotary_pos_emb, torch.jit.ScriptFunction)


def test_npu_attention_and_rms_norm_go_through_the_backend_kernels(fresh):
    fresh.apply(*MODEL_PATCHES)
    model = fresh.generator()
    with torch.no_grad():
        expected = model(input_ids=PROMPT).logits
    calls = {"attention": 0, "rms_norm": 0}

    def attention(*args):
        calls["attention"] += 1
        return PORTABLE_KERNELS.attention(*args)

    def rms_norm(*args):
        calls["rms_norm"] += 1
        return PORTABLE_KERNELS.rms_norm(*args)

    npu = Context.current("npu", Kernels("counting", attention, rms_norm))
    for patch in (NPU_ATTENTION, NPU_RMS_NORM):
        assert patch.needed(npu, fresh.model).needed and not patch.needed(CPU, fresh.model).needed
        patch.apply(npu, fresh.model)
    with torch.no_grad():
        patched = model(input_ids=PROMPT).logits
    assert calls == {"attention": 2, "rms_norm": 5}
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    assert getattr(vars(fresh.model.CoreAttention)["forward"], MARK) == "npu-attention-kernel"


def test_the_first_generation_tokenizer_is_fixed_too(tiny_dir):
    """ChatGLM-6B names its wrapper sp_tokenizer and passes num_image_tokens; the patch forwards it."""
    path = Path(__file__).resolve().parent.parent / "fixtures" / "remote_chatglm_v1" / "tokenization_chatglm.py"
    spec = importlib.util.spec_from_file_location("glm_portable_test_v1_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = lambda: module.ChatGLMTokenizer(str(tiny_dir / "tokenizer.model"), num_image_tokens=7)  # noqa: E731
    assert TOKENIZER_INIT_ORDER.needed(CPU, module).needed
    error, message = SYMPTOMS["tokenizer-init-order"]
    with pytest.raises(error, match=message):
        build()
    TOKENIZER_INIT_ORDER.apply(CPU, module)
    try:
        tokenizer = build()
        assert tokenizer.sp_tokenizer.num_image_tokens == 7 and tokenizer.vocab_size == 7 + 1000
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize("红色")) == [
            tokenizer.sp_tokenizer.piece_to_id(p) for p in tokenizer.tokenize("红色")]
    finally:
        TOKENIZER_INIT_ORDER.revert(module)
