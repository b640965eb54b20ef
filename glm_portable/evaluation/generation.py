"""Batched generation for evaluation: left-padded prompts, the KV cache, length-sorted batches."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from glm_portable.modeling import ChatGLMTokenizer, GenerationSettings
from glm_portable.modeling.model import preallocated_cache


def evaluation_settings(max_new_tokens: int = 128, sample: bool = False, top_p: float = 0.7,
                        temperature: float = 0.95, seed: int = 42) -> GenerationSettings:
    """Greedy by default (reproducible); ``sample`` reproduces THUDM's evaluation (top_p 0.7, temperature 0.95)."""
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=sample, top_p=top_p, temperature=temperature, seed=seed)


@torch.inference_mode()
def generate_batched(
    model: torch.nn.Module,
    tokenizer: ChatGLMTokenizer,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    settings: GenerationSettings,
    on_batch: Optional[Callable[[int], None]] = None,
    static_cache: bool = False,
) -> list[str]:
    """Decoded answers in the order of ``prompts``.

    Prompts are grouped by length so that batches carry little padding; left padding with position
    ids makes every row's result independent of its batch mates (greedy output equals batch size 1).
    ``static_cache``: decode on preallocated keys and values (one shape for every step: what graph
    compilers and CUDA graphs need), where the model supports it (ChatGLM2/3, native); the answers are
    the same.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    kwargs = settings.generate_kwargs(tokenizer)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in tokenizer.pad([prompts[i] for i in rows]).items()}
        cache = _static_cache(model, batch["input_ids"].shape[1] + settings.max_new_tokens) if static_cache else {}
        output = model.generate(**batch, **kwargs, **cache)
        width = batch["input_ids"].shape[1]
        for row, ids in zip(rows, output[:, width:].tolist()):
            answers[row] = tokenizer.decode(_until_stop(ids, tokenizer.stop_ids)).strip()
        if on_batch:
            on_batch(len(rows))
    return answers


def _static_cache(model: torch.nn.Module, tokens: int) -> dict[str, object]:
    """``generate``'s cache argument (``cache`` since transformers 5.24) holding a preallocated cache, or nothing."""
    from glm_portable.patches import Context

    cache = preallocated_cache(model, tokens)
    if cache is None:
        return {}
    return {"cache" if Context.current("cpu").at_least("transformers", "5.24") else "past_key_values": cache}


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids
