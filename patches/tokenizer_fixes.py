"""Fixes for ChatGLM's remote tokenizer classes (docs/transformers-breakages.md, 1-3)."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

from .registry import since_transformers, Context, Decision, Patch, Replacements
from .remote_classes import own, source_of, tokenizer_classes

SP_ATTRIBUTES = ("tokenizer", "sp_tokenizer")  # v2/v3, v1


def _late_sentencepiece(cls: type) -> str | None:
    """The attribute holding the SentencePiece wrapper when ``__init__`` creates it only after the base
    ``__init__`` (which reads the vocabulary from 4.34 on); None when it is created first."""
    source = source_of(own(cls, "__init__"))
    base_call = source.find("super().__init__(")
    for attribute in SP_ATTRIBUTES:
        assigned = source.find(f"self.{attribute} =")
        if assigned != -1 and base_call != -1 and assigned > base_call:
            return attribute
    return None


def _init_order_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "4.34", [cls for cls in tokenizer_classes(module) if _late_sentencepiece(cls)],
        absent="the tokenizer builds its SentencePiece object before the base __init__",
        older="does not read the vocabulary in __init__",
        needed="{classes} builds it after the base __init__, which reads the vocabulary since 4.34")


def _init_order(ctx: Context, module: ModuleType) -> Replacements:
    if not hasattr(module, "SPTokenizer"):
        return []
    return [(cls, "__init__", _sentencepiece_first(own(cls, "__init__"), attribute, module.SPTokenizer))
            for cls in tokenizer_classes(module) if (attribute := _late_sentencepiece(cls)) is not None]


def _sentencepiece_first(original: Any, attribute: str, builder: type) -> Any:
    """Build the wrapper (with the arguments it takes, v1's num_image_tokens) before the original runs."""
    accepted = set(inspect.signature(builder).parameters) - {"model_path"}

    def __init__(self, vocab_file, *args, **kwargs):
        if attribute not in self.__dict__:
            setattr(self, attribute, builder(vocab_file, **{k: v for k, v in kwargs.items() if k in accepted}))
        original(self, vocab_file, *args, **kwargs)

    return __init__


TOKENIZER_INIT_ORDER = Patch(
    name="tokenizer-init-order", target="ChatGLMTokenizer.__init__",
    symptom="AttributeError: object has no attribute 'tokenizer' / 'sp_tokenizer' (or \"'property' object cannot be "
            "interpreted as an integer\") when the tokenizer loads",
    needed=_init_order_needed, replacements=_init_order)


def _pads_without_side(cls: type) -> bool:
    pad = own(cls, "_pad")
    return pad is not None and "padding_side" not in inspect.signature(pad).parameters


def _pad_needed(ctx: Context, module: ModuleType) -> Decision:
    return since_transformers(
        ctx, "4.45", [cls for cls in tokenizer_classes(module) if _pads_without_side(cls)],
        absent="no tokenizer _pad without a padding_side parameter",
        older="does not pass padding_side to _pad",
        needed="{classes}._pad lacks padding_side, which transformers passes since 4.45")


def _pad(ctx: Context, module: ModuleType) -> Replacements:
    return [(cls, "_pad", _pad_ignoring_side(own(cls, "_pad"))) for cls in tokenizer_classes(module)
            if _pads_without_side(cls)]


def _pad_ignoring_side(original: Any) -> Any:
    def _pad(self, encoded_inputs, *args, padding_side=None, **kwargs):
        """ChatGLM pads on the left whatever is asked; its own _pad asserts it."""
        return original(self, encoded_inputs, *args, **kwargs)

    return _pad


TOKENIZER_PAD_SIDE = Patch(
    name="tokenizer-pad-padding-side", target="ChatGLMTokenizer._pad",
    symptom="TypeError: _pad() got an unexpected keyword argument 'padding_side'",
    needed=_pad_needed, replacements=_pad)


def _calls_batch_encode_plus(cls: type) -> bool:
    return "batch_encode_plus(" in source_of(cls) and not hasattr(cls, "batch_encode_plus")


def _batch_needed(ctx: Context, module: ModuleType) -> Decision:
    classes = [cls.__name__ for cls in tokenizer_classes(module) if _calls_batch_encode_plus(cls)]
    if not classes:
        return Decision(False, "batch_encode_plus is present or unused", present=False)
    return Decision(True, f"{', '.join(classes)} calls batch_encode_plus, removed in transformers 5.0")


def _batch_encode_plus(ctx: Context, module: ModuleType) -> Replacements:
    def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
        """The 4.x name for encoding a batch; ``__call__`` does the same on 5.x."""
        return self(batch_text_or_text_pairs, **kwargs)

    return [(cls, "batch_encode_plus", batch_encode_plus)
            for cls in tokenizer_classes(module) if _calls_batch_encode_plus(cls)]


TOKENIZER_BATCH_ENCODE_PLUS = Patch(
    name="tokenizer-batch-encode-plus", target="ChatGLMTokenizer.batch_encode_plus",
    symptom="AttributeError: 'ChatGLMTokenizer' object has no attribute 'batch_encode_plus' (build_chat_input, chat)",
    needed=_batch_needed, replacements=_batch_encode_plus)

TOKENIZER_PATCHES = (TOKENIZER_INIT_ORDER, TOKENIZER_PAD_SIDE, TOKENIZER_BATCH_ENCODE_PLUS)
