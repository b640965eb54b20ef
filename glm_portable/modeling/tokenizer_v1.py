"""ChatGLM-6B (first generation) tokenizer: ``ice_text.model`` with upstream's text rewrites and ids.

The same interface as ``ChatGLMTokenizer`` (encode, pad, decode, stop ids, save and load), so data,
training, chat and serving need not know which generation they hold. The facts it follows are in
``docs/chatglm-6b.md``: newline, tab and space runs are rewritten into pieces before SentencePiece,
every piece id is shifted by ``num_image_tokens``, and ``[gMASK] <sop>`` go at the END of a prompt.
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

from .positions_v1 import advance_v1_positions, v1_position_ids

TOKENIZER_FILE = "ice_text.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
FAMILY = "chatglm"
MAX_BLANK = 80
DEFAULT_IMAGE_TOKENS = 20000  # upstream's class default when tokenizer_config.json does not say
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
ALIASES = {"sop": "<sop>", "eop": "<eop>"}


def rewrite_text(text: str) -> str:
    """``\\n`` → ``<n>``, ``\\t`` → ``<|tab|>``, runs of 2..80 spaces → ``<|blank_N|>`` (longest first)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def restore_text(text: str) -> str:
    """The inverse of ``rewrite_text`` on decoded pieces."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class ChatGLM1Tokenizer:
    """Encodes with the rewrites and SentencePiece, appends ``[gMASK] <sop>``, pads on the left with 2-D positions."""

    padding_side = "left"
    family = FAMILY

    def __init__(self, model_file: str | Path, config: dict | None = None) -> None:
        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{self.model_file}: not a SentencePiece model: {exc}") from None
        self.config = dict(config or {})
        offset = self.config.get("num_image_tokens", DEFAULT_IMAGE_TOKENS)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise UserError(f"{self.model_file.parent / TOKENIZER_CONFIG}: num_image_tokens is {offset!r}; "
                            "expected a non-negative integer")
        self.num_image_tokens = offset
        self.special_ids = {}
        for piece in SPECIAL_PIECES + ("<pad>",):
            index = self.sp.piece_to_id(piece)
            if index == self.sp.unk_id():
                raise UserError(f"{self.model_file}: piece {piece!r} missing (expected a ChatGLM-6B ice_text model)")
            self.special_ids[piece] = index + offset
        self.bos_token_id = self.special_ids["<sop>"]
        self.eos_token_id = self.special_ids["<eop>"]
        self.pad_token_id = self.special_ids["<pad>"]
        self.mask_token_id = self.special_ids["[MASK]"]
        self.gmask_token_id = self.special_ids["[gMASK]"]

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + self.num_image_tokens

    def get_command(self, token: str) -> int:
        token = ALIASES.get(token, token)
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of ChatGLM-6B")
        return self.special_ids[token]

    @property
    def suffix_ids(self) -> list[int]:
        """What ``encode`` appends: ``[gMASK] <sop>``."""
        return [self.gmask_token_id, self.bos_token_id]

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_token_id]

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text (upstream's dummy-prefix form), no special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Plain-text ids of many texts in one SentencePiece call; repeated texts are encoded once."""
        unique = list(dict.fromkeys(texts))
        pieces = self.sp.encode([rewrite_text(t) for t in unique], num_threads=max(1, num_threads))
        offset = self.num_image_tokens
        encoded = {text: [i + offset for i in ids] for text, ids in zip(unique, pieces)}
        return [list(encoded[text]) for text in texts]

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Like upstream ``tokenizer.encode(..., truncation=True, max_length=M)``: the text is cut so that the result,
        ``[gMASK] <sop>`` included, fits in M."""
        ids = self.encode_text(text)
        suffix = self.suffix_ids if add_special_tokens else []
        if max_length is not None:
            ids = ids[: max(max_length - len(suffix), 0)]
        return ids + suffix

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: image-token ids and padding dropped, the rewrites undone; special tokens spelled out
        only when kept."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        names = {v: k for k, v in self.special_ids.items() if k != "<pad>"}
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if token == self.pad_token_id or token < self.num_image_tokens or token >= self.vocab_size:
                continue
            if token in names:
                if not skip_special_tokens:
                    pieces += [self.sp.decode(run), names[token]]
                    run = []
                continue
            run.append(token - self.num_image_tokens)
        pieces.append(self.sp.decode(run))
        return restore_text("".join(pieces))

    def batch_decode(self, batch: Iterable[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def pad(self, sequences: Sequence[Sequence[int]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Left-pad: input_ids, attention_mask and ``[b, 2, s]`` position ids (position, block position; 0 on padding)."""
        width = max(max(len(s) for s in sequences), max_length or 0)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq):] = 1
        positions = v1_position_ids(ids, mask, self.bos_token_id, (self.gmask_token_id, self.mask_token_id))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    @staticmethod
    def advance_positions(positions: torch.Tensor) -> torch.Tensor:
        """Position ids of the token after the last: the position stays, the block position counts on."""
        return advance_v1_positions(positions)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        return self.pad([self.encode(t, max_length=max_length) for t in texts])

    def fingerprint(self) -> str:
        """sha256 of the SentencePiece model, the id offset and the family: equal fingerprints tokenize identically."""
        digest = hashlib.sha256(self.model_file.read_bytes())
        digest.update(f"{FAMILY}:{self.num_image_tokens}".encode())
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (directory / TOKENIZER_FILE).resolve():
            shutil.copyfile(self.model_file, directory / TOKENIZER_FILE)
        config = {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
                  "padding_side": "left", "bos_token": "<sop>", "eos_token": "<eop>", "mask_token": "[MASK]",
                  "gmask_token": "[gMASK]", "pad_token": "<pad>", "unk_token": "<unk>", **self.config,
                  "num_image_tokens": self.num_image_tokens}
        write_json_object(directory / TOKENIZER_CONFIG, config)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ChatGLM1Tokenizer":
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG
        config = read_json_object(config_path) if config_path.is_file() else {}
        return cls(directory / TOKENIZER_FILE, config)
