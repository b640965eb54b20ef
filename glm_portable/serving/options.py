"""The options of the commands that use a tuned model (``chat``, ``serve``, ``export``): each defined once, here
(see ``glm_portable.schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from glm_portable.errors import UserError
from glm_portable.schema import (CACHE_HELP, CHECKPOINT_HELP, DEVICE_HELP, IMPL_HELP, MODEL_DTYPE_HELP,
                                 QUANTIZATION_HELP, CacheKind, Dtype, QuantizationBit, option)


@dataclass
class ChatOptions:
    model: Path = option(help="Base model directory.")
    checkpoint: Optional[Path] = option(None, CHECKPOINT_HELP)
    query: Optional[str] = option(None, "Answer this one question, print the answer and exit.")
    device: Optional[str] = option(None, DEVICE_HELP)
    dtype: Optional[Dtype] = option(None, MODEL_DTYPE_HELP)
    quantization_bit: Optional[QuantizationBit] = option(None, QUANTIZATION_HELP)
    max_new_tokens: int = option(256, "Tokens an answer gets at most.", minimum=1)
    greedy: bool = option(False, "Greedy decoding instead of ChatGLM's sampling (top_p 0.8, temperature 0.8).")
    top_p: float = option(0.8, "Top-p when sampling.")
    temperature: float = option(0.8, "Temperature when sampling.")
    impl: Literal["native", "remote"] = option("native", IMPL_HELP)

    def check(self) -> None:
        if self.query is not None and not self.query.strip():
            raise UserError("--query is empty: give the question to answer")


@dataclass
class ServeOptions:
    model: Path = option(help="Base model directory.")
    checkpoint: Optional[Path] = option(None, CHECKPOINT_HELP)
    impl: Literal["native", "remote"] = option("native", IMPL_HELP)
    device: Optional[str] = option(None, DEVICE_HELP)
    dtype: Optional[Dtype] = option(None, MODEL_DTYPE_HELP)
    quantization_bit: Optional[QuantizationBit] = option(None, QUANTIZATION_HELP)
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 opens the server to the network.")
    port: int = option(8000, "Port to listen on (0: any free port, printed at start).", minimum=0, maximum=65535)
    api_key: Optional[str] = option(None, "Require 'Authorization: Bearer KEY' on /v1 (or set $GLM_PORTABLE_API_KEY).",
                                    envvar="GLM_PORTABLE_API_KEY")
    model_name: Optional[str] = option(None, "Name in /v1/models (default: the checkpoint's run, else the model "
                                       "directory's name).")
    max_batch_size: int = option(16, "Requests decoded together in one batch.", minimum=1)
    cache: Optional[CacheKind] = option(None, CACHE_HELP)
    batch_wait_ms: float = option(5.0, "How long the first request of a batch waits for others to join.",
                                  minimum=0, maximum=10_000)
    max_new_tokens: int = option(256, "Tokens a request gets when it sets no max_tokens, and the most it may ask.",
                                 minimum=1)
    temperature: float = option(0.8, "Temperature when a request sets none (0: greedy).", minimum=0, maximum=2)
    top_p: float = option(0.8, "Top-p when a request sets none.", minimum=0.01, maximum=1)

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.checkpoint is not None:
            checkpoint = Path(self.checkpoint)
            return checkpoint.parent.name if checkpoint.name.startswith("checkpoint-") else checkpoint.name
        return Path(self.model).name


@dataclass
class ExportOptions:
    model: Path = option(help="Base model directory the checkpoint was trained on.")
    checkpoint: Path = option(help="A run directory or checkpoint: P-Tuning prefix, LoRA adapter or full model.")
    out: Path = option(help="The model directory to write (upstream layout).")
    dtype: Optional[Dtype] = option(None, "Weight dtype (default: the base's torch_dtype in config.json).")
    overwrite: bool = option(False, "Replace OUT if it holds files.")

    def check(self) -> None:
        if Path(self.out).resolve() in (Path(self.model).resolve(), Path(self.checkpoint).resolve()):
            raise UserError(f"--out {self.out}: must differ from --model and --checkpoint")
