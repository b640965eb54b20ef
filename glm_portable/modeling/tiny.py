"""``make-tiny-model``: a seconds-to-build ChatGLM-6B, ChatGLM2 or ChatGLM3 directory in upstream layout for tests, demo and benchmarks."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from glm_portable.atomic import atomic_directory
from glm_portable.errors import UserError
from glm_portable.schema import validate

from .checkpoint import write_weights
from .architectures import new_model
from .config import ChatGLM1Config, ChatGLMConfig
from .options import TinyModelOptions
from .tokenizer import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS, TOKENIZER_FILE, ChatGLMTokenizer
from .tokenizer_v1 import FAMILY as V1_FAMILY
from .tokenizer_v1 import MAX_BLANK, SPECIAL_PIECES, ChatGLM1Tokenizer, rewrite_text
from .tokenizer_v1 import TOKENIZER_FILE as V1_TOKENIZER_FILE

FFN_RATIO = 13696 / 4096  # upstream's ffn_hidden_size / hidden_size
SEQ_LENGTH = {"chatglm2": 32768, "chatglm3": 8192}
V1_TEXT_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
V1_CONTROL_PIECES = list(SPECIAL_PIECES[:3]) + ["<unused_0>"] + list(SPECIAL_PIECES[3:]) + ["<ENC>", "<dBLOCK>"]


def bundled_corpus() -> list[str]:
    """The Chinese and English lines the tiny tokenizer is trained on (ADGEN-style attributes included)."""
    text = resources.files("glm_portable.modeling").joinpath("corpus/tiny.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_sentencepiece(vocab_size: int, lines: list[str] | None = None) -> bytes:
    """A BPE model with ChatGLM's id layout: unk 0 (also padding), bos 1, eos 2, byte fallback, no normalisation."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or bundled_corpus()), model_writer=writer, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return writer.getvalue()


def tiny_config(
    family: str, sp_vocab_size: int, layers: int, hidden_size: int, heads: int, kv_groups: int
) -> ChatGLMConfig:
    if hidden_size % heads:
        raise UserError(f"--hidden-size {hidden_size} must be divisible by --heads {heads}")
    if heads % kv_groups:
        raise UserError(f"--heads {heads} must be divisible by --kv-groups {kv_groups}")
    if (hidden_size // heads) % 4:
        raise UserError(f"head size {hidden_size // heads} must be a multiple of 4 (half of it is rotated in pairs)")
    specials = len(CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM2_SPECIALS)
    padded_vocab = -(-(sp_vocab_size + specials) // 64) * 64
    ffn = max(2, int(round(hidden_size * FFN_RATIO / 2)) * 2)
    return ChatGLMConfig(
        num_layers=layers, hidden_size=hidden_size, ffn_hidden_size=ffn, kv_channels=hidden_size // heads,
        num_attention_heads=heads, multi_query_group_num=kv_groups, padded_vocab_size=padded_vocab,
        seq_length=SEQ_LENGTH[family],
    )


def make_tiny_model(out_dir: str | Path, **choices: Any) -> Path:
    """Write the tokenizer, tokenizer_config.json, config.json and seeded random weights (safetensors).

    ``choices`` are ``TinyModelOptions`` fields (family, layers, hidden_size, …; their defaults there).
    Family chatglm writes a ChatGLM-6B directory (``ice_text.model``); chatglm2/3 a ChatGLM2/3 one.
    """
    options = TinyModelOptions(out=Path(out_dir), **choices)
    validate(options)
    family, layers, hidden_size, heads = options.family, options.layers, options.hidden_size, options.heads
    vocab_size, seed, shards, overwrite = options.vocab_size, options.seed, options.shards, options.overwrite
    kv_groups = 2 if options.kv_groups is None else options.kv_groups
    if family == V1_FAMILY:
        return _make_tiny_v1(out_dir, layers, hidden_size, heads, vocab_size, seed, shards, overwrite)
    proto = train_sentencepiece(vocab_size)
    sp_vocab = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    config = tiny_config(family, sp_vocab, layers, hidden_size, heads, kv_groups)
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / TOKENIZER_FILE).write_bytes(proto)
        ChatGLMTokenizer(tmp / TOKENIZER_FILE, family).save_pretrained(tmp)
        torch.manual_seed(seed)
        model = new_model(config)
        config.save(tmp, dtype="float32")
        write_weights(model.state_dict(), tmp, num_shards=shards)
    return Path(out_dir)


def train_ice_text(vocab_size: int, lines: list[str] | None = None) -> bytes:
    """A small ``ice_text``-style model: ``<unk> <s> </s> <pad>`` first, ``<n>``, ``<|tab|>`` and
    ``<|blank_2..80|>`` as whole pieces, ChatGLM-6B's special tokens as control pieces."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([rewrite_text(line) for line in (lines or bundled_corpus())]), model_writer=writer,
        vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=V1_TEXT_PIECES, control_symbols=V1_CONTROL_PIECES, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return writer.getvalue()


def tiny_v1_config(sp_vocab_size: int, layers: int, hidden_size: int, heads: int,
                   tokenizer: ChatGLM1Tokenizer) -> ChatGLM1Config:
    if hidden_size % heads or (hidden_size // heads) % 4:
        raise UserError(f"--hidden-size {hidden_size} must split into --heads {heads} heads of a multiple of 4 "
                        "(each half of a head is rotated)")
    return ChatGLM1Config(
        num_layers=layers, hidden_size=hidden_size, num_attention_heads=heads, inner_hidden_size=4 * hidden_size,
        vocab_size=-(-sp_vocab_size // 64) * 64, max_sequence_length=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _make_tiny_v1(out_dir: str | Path, layers: int, hidden_size: int, heads: int, vocab_size: int, seed: int,
                  shards: int, overwrite: bool) -> Path:
    proto = train_ice_text(vocab_size)
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / V1_TOKENIZER_FILE).write_bytes(proto)
        tokenizer = ChatGLM1Tokenizer(tmp / V1_TOKENIZER_FILE, {"num_image_tokens": 0})
        tokenizer.save_pretrained(tmp)
        config = tiny_v1_config(tokenizer.vocab_size, layers, hidden_size, heads, tokenizer)
        torch.manual_seed(seed)
        model = new_model(config)
        config.save(tmp, dtype="float32")
        write_weights(model.state_dict(), tmp, num_shards=shards)
    return Path(out_dir)
