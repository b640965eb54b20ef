"""``make-tiny-model``'s options, each defined once (see ``glm_portable.schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from glm_portable.errors import UserError
from glm_portable.schema import option

TinyFamily = Literal["chatglm", "chatglm2", "chatglm3"]


@dataclass
class TinyModelOptions:
    out: Path = option(help="Directory to create.", positional=True)
    family: TinyFamily = option("chatglm3", "ChatGLM-6B, ChatGLM2 or ChatGLM3 (architecture, prompt format and "
                                "special tokens).")
    layers: int = option(2, "Number of transformer layers.", minimum=1)
    hidden_size: int = option(64, "Hidden size.", minimum=1)
    heads: int = option(4, "Attention heads (head size = hidden / heads).", minimum=1)
    kv_groups: Optional[int] = option(None, "Key/value groups (multi-query attention; default 2; not for chatglm).",
                                      minimum=1)
    vocab_size: int = option(1000, "SentencePiece vocabulary size before the special tokens.", minimum=300)
    seed: int = option(0, "Seed of the random weights.")
    shards: int = option(1, "Number of safetensors shards (more than one writes an index json).", minimum=1)
    overwrite: bool = option(False, "Replace OUT if it exists.")

    def check(self) -> None:
        if self.family == "chatglm" and self.kv_groups is not None:
            raise UserError("--kv-groups does not apply to --family chatglm: ChatGLM-6B has full multi-head attention")
        if self.family == "chatglm" and self.vocab_size < 400:
            raise UserError(f"--vocab-size {self.vocab_size} is too small for --family chatglm: its fixed pieces and "
                            "byte fallback take 350")
