"""ChatGLM2/3 tokenizer: SentencePiece with the special tokens appended after its vocabulary.

A plain class rather than a transformers tokenizer subclass: transformers' tokenizer base classes
change with every major release (docs/transformers-breakages.md), and ChatGLM needs only
SentencePiece plus a handful of ids. It saves and loads with the model directory all the same.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

from glm_portable.errors import UserError
from glm_portable.jsonfile import read_json_object, write_json_object

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
FAMILY_KEY = "glm_portable_family"
FAMILIES = ("chatglm2", "chatglm3")
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")


class ChatGLMTokenizer:
    """Encodes with SentencePiece, prefixes ``[gMASK] sop``, pads on the left."""

    padding_side = "left"

    def __init__(self, model_file: str | Path, family: str = "chatglm2", config: dict | None = None) -> None:
        if family not in FAMILIES:
            raise UserError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{self.model_file}: not a SentencePiece model: {exc}") from None
        self.family = family
        self.config = dict(config or {})
        self.sp_vocab_size = self.sp.vocab_size()
        specials = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM2_SPECIALS
        self.special_ids = {token: self.sp_vocab_size + i for i, token in enumerate(specials)}
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.sp_vocab_size + len(self.special_ids)

    def get_command(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of {self.family}")
        return self.special_ids[token]

    @property
    def prefix_ids(self) -> list[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    @property
    def stop_ids(self) -> list[int]:
        """Generation ends at eos; ChatGLM3 also ends at the next user or observation turn."""
        if self.family == "chatglm3":
            return [self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")]
        return [self.eos_token_id]

    def encode_text(self, text: str) -> list[int]:
        """SentencePiece ids of plain text, no special tokens."""
        return list(self.sp.encode(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Plain-text ids of many texts in one SentencePiece call (its own thread pool).

        Repeated texts (datasets repeat prompts, e.g. ADGEN's attribute strings) are encoded once.
        """
        unique = list(dict.fromkeys(texts))
        encoded = dict(zip(unique, self.sp.encode(unique, num_threads=max(1, num_threads))))
        return [encoded[text] for text in texts]

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Like upstream ``tokenizer.encode(..., truncation=True, max_length=M)``: the text is cut so that the
        result, ``[gMASK] sop`` included, fits in M."""
        ids = self.encode_text(text)
        prefix = self.prefix_ids if add_special_tokens else []
        if max_length is not None:
            ids = ids[: max(max_length - len(prefix), 0)]
        return prefix + ids

    def role_message_ids(self, role: str, content: str, metadata: str = "") -> list[int]:
        """ChatGLM3 message: ``<|role|>`` + encode(metadata + newline) + encode(content)."""
        if self.family != "chatglm3":
            raise ValueError("role messages are a ChatGLM3 format")
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.encode_text(f"{metadata}\n") + self.encode_text(content)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens, bos/eos and padding are dropped (or spelled out when kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        names = {v: k for k, v in self.special_ids.items()}
        dropped = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if token in names or token >= self.sp_vocab_size or token in dropped:
                if skip_special_tokens:
                    continue
                pieces.append(self.sp.decode(run))
                run = []
                pieces.append(names.get(token, self.sp.id_to_piece(token) if token < self.sp_vocab_size else ""))
            else:
                run.append(token)
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def batch_decode(self, batch: Iterable[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def pad(self, sequences: Sequence[Sequence[int]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Left-pad to the longest (or ``max_length``): input_ids, attention_mask, position_ids (0 on padding)."""
        width = max(max(len(s) for s in sequences), max_length or 0)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        positions = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq):] = 1
                positions[row, width - len(seq):] = torch.arange(len(seq))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    @staticmethod
    def advance_positions(positions: torch.Tensor) -> torch.Tensor:
        """Position ids of the token after the last."""
        return positions[:, -1:] + 1

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Encode one text or a batch with the ``[gMASK] sop`` prefix, left-padded into tensors."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad([self.encode(t, max_length=max_length) for t in texts])

    def fingerprint(self) -> str:
        """sha256 of the SentencePiece model and the family: equal fingerprints tokenize identically."""
        digest = hashlib.sha256(self.model_file.read_bytes())
        digest.update(self.family.encode())
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (directory / TOKENIZER_FILE).resolve():
            shutil.copyfile(self.model_file, directory / TOKENIZER_FILE)
        config = {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
                  "padding_side": "left", **self.config, FAMILY_KEY: self.family}
        write_json_object(directory / TOKENIZER_CONFIG, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, family: str | None = None) -> "ChatGLMTokenizer":
        directory = Path(directory)
        model_file = directory / TOKENIZER_FILE
        if not model_file.is_file():
            if (directory / "ice_text.model").is_file():
                raise UserError(f"{directory}: a ChatGLM-6B tokenizer (ice_text.model) but no first-generation "
                                "config.json beside it")
            raise UserError(f"{directory}: no {TOKENIZER_FILE} (expected a ChatGLM2/3 model directory)")
        config = _read_json(directory / TOKENIZER_CONFIG)
        return cls(model_file, family or detect_family(directory, config), config)


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def detect_family(directory: str | Path, tokenizer_config: dict | None = None) -> str:
    """chatglm3 or chatglm2, from our own marker, upstream's tokenizer code, or the model's name."""
    directory = Path(directory)
    config = tokenizer_config if tokenizer_config is not None else _read_json(directory / TOKENIZER_CONFIG)
    if config.get(FAMILY_KEY) in FAMILIES:
        return config[FAMILY_KEY]
    code = directory / "tokenization_chatglm.py"
    if code.is_file():
        return "chatglm3" if "<|observation|>" in code.read_text(encoding="utf-8", errors="replace") else "chatglm2"
    names = " ".join(str(config.get(k, "")) for k in ("name_or_path", "_name_or_path")) + " " + directory.name
    return "chatglm3" if "chatglm3" in names.lower() else "chatglm2"
