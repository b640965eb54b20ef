"""Batched generation for evaluation: left-padded prompts, the KV cache, length-sorted batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from glm_portable.modeling import ChatGLMTokenizer


@dataclass
class SamplingSettings:
    """Greedy by default (reproducible); ``sample`` reproduces THUDM's evaluation (top_p 0.7, temperature 0.95)."""

    max_new_tokens: int = 128
    sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    seed: int = 42

    def generate_kwargs(self, tokenizer: ChatGLMTokenizer) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample,
                  "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_token_id}
        if self.sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        return kwargs


@torch.inference_mode()
def generate_batched(
    model: torch.nn.Module,
    tokenizer: ChatGLMTokenizer,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    settings: SamplingSettings,
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[str]:
    """Decoded answers in the order of ``prompts``.

    Prompts are grouped by length so that batches carry little padding; left padding with position
    ids makes every row's result independent of its batch mates (greedy output equals batch size 1).
    """
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    kwargs = settings.generate_kwargs(tokenizer)
    if settings.sample:
        torch.manual_seed(settings.seed)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in tokenizer.pad([prompts[i] for i in rows]).items()}
        output = model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        for row, ids in zip(rows, output[:, width:].tolist()):
            answers[row] = tokenizer.decode(_until_stop(ids, tokenizer.stop_ids)).strip()
        if on_batch:
            on_batch(len(rows))
    return answers


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids
