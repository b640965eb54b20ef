"""A benchmark's workload: the model shape, the method and the synthetic data, all fixed by a seed.

Two records can be compared only when their workloads are equal, so everything that changes the
work done or the losses seen lives here; the device, its count's placement and the dtype do not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from glm_portable.errors import UserError
from glm_portable.modeling import ChatGLM1Config, ChatGLMConfig, load_config
from glm_portable.modeling.model import IGNORE_INDEX
from glm_portable.modeling.tiny import tiny_config
from glm_portable.training.methods import METHODS, get_method

# "1b" is a 1.1B-parameter cut of the ChatGLM2 architecture for full fine-tuning on one card.
SHAPES: dict[str, Callable[[], ChatGLMConfig]] = {
    "chatglm-6b": ChatGLM1Config,
    "chatglm2-6b": ChatGLMConfig,
    "chatglm3-6b": lambda: ChatGLMConfig(seq_length=8192),
    "1b": lambda: ChatGLMConfig(num_layers=16, hidden_size=2048, ffn_hidden_size=6848, num_attention_heads=16),
}
TINY = "tiny"
SHAPE_NAMES = (TINY, *SHAPES)
FIRST_ID = 3  # after the pad/unk, bos and eos ids
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                       "multi_query_group_num", "inner_hidden_size", "padded_vocab_size")  # each as the shape has it


@dataclass
class Workload:
    shape: str
    method: str = "ptuning"
    batch_size: int = 4
    grad_accum: int = 1
    source_length: int = 64
    target_length: int = 128
    pre_seq_len: int = 128
    lora_rank: int = 8
    lr: Optional[float] = None
    steps: int = 20
    warmup: int = 3
    seed: int = 42
    world_size: int = 1
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        get_method(self.method)
        if self.shape not in SHAPE_NAMES and not (Path(self.shape) / "config.json").is_file():
            raise UserError(f"--shape {self.shape}: expected {', '.join(SHAPE_NAMES)} or a model directory with config.json")
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--steps": self.steps,
                    "--source-length": self.source_length, "--target-length": self.target_length,
                    "--pre-seq-len": self.pre_seq_len, "--lora-rank": self.lora_rank}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr

    @property
    def seq_length(self) -> int:
        return self.source_length + self.target_length

    @property
    def from_directory(self) -> bool:
        """A model directory's own weights, rather than random weights in a named shape."""
        return self.shape not in SHAPE_NAMES

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def config(self) -> ChatGLMConfig:
        """The architecture: a named shape, or a model directory's config.json."""
        if self.shape == TINY:
            return tiny_config("chatglm3", 1000, layers=2, hidden_size=128, heads=4, kv_groups=2)
        if self.shape in SHAPES:
            return SHAPES[self.shape]()
        return load_config(self.shape)

    def as_record(self) -> dict[str, Any]:
        """What a record stores: a directory by its name and architecture, since paths differ between machines."""
        data = asdict(self)
        data["lr"] = self.learning_rate
        if self.from_directory:
            data["shape"] = f"dir:{Path(self.shape).resolve().name}"
        config = self.config()
        data["architecture"] = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS if hasattr(config, k)}
        kept = get_method(self.method).record_fields
        for key in {field for m in METHODS.values() for field in m.record_fields} - set(kept):
            data.pop(key)
        return data


def synthetic_rows(workload: Workload, config: ChatGLMConfig) -> dict[str, list[list[int]]]:
    """One row for every sample the run consumes, in a seed-fixed order.

    Prompt tokens follow a Zipf law over the vocabulary, as words do, and the answer repeats the
    prompt: a model first learns the frequencies, then the copy, so losses fall as in real training
    instead of sitting at log(vocab) as with uniform noise. ChatGLM-6B rows end their prompt with
    ``[gMASK] <sop>``, which its positions and mask are built from.
    """
    vocab_size = config.padded_vocab_size
    generator = torch.Generator().manual_seed(workload.seed)
    rows = workload.total_steps * workload.batch_size * workload.grad_accum * workload.world_size
    frequencies = 1.0 / torch.arange(1, vocab_size - FIRST_ID + 1, dtype=torch.float64)
    draws = torch.multinomial(frequencies, rows * workload.source_length, replacement=True, generator=generator)
    source = (draws + FIRST_ID).view(rows, workload.source_length)
    repeats = -(-workload.target_length // workload.source_length)
    target = source.repeat(1, repeats)[:, :workload.target_length]
    if isinstance(config, ChatGLM1Config) and workload.source_length >= 2:
        source = source.clone()
        source[:, -2:] = torch.tensor([config.gmask_token_id, config.bos_token_id])
    ids = torch.cat([source, target], dim=1)
    labels = torch.cat([torch.full_like(source, IGNORE_INDEX), target], dim=1)
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}
