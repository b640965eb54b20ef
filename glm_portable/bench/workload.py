"""A benchmark's synthetic data: the rows a workload trains on, fixed by its seed."""

from __future__ import annotations

import torch

from glm_portable.modeling import ChatGLM1Config, ChatGLMConfig
from glm_portable.modeling.model import IGNORE_INDEX

from .options import Workload

FIRST_ID = 3  # after the pad/unk, bos and eos ids


def synthetic_rows(workload: Workload, config: ChatGLMConfig) -> dict[str, list[list[int]]]:
    """One row for every sample the run consumes (packed, enough to fill its sequences), in a seed-fixed order.

    Prompt tokens follow a Zipf law over the vocabulary, as words do, and the answer repeats the
    prompt: a model first learns the frequencies, then the copy, so losses fall as in real training
    instead of sitting at log(vocab) as with uniform noise. ChatGLM-6B rows end their prompt with
    ``[gMASK] <sop>``, which its positions and mask are built from. With ``varied_lengths`` each row keeps
    a seeded share of its prompt (its first ⌈source/2⌉ tokens at least) and of its answer (⌈target/4⌉ at least).
    """
    vocab_size = config.padded_vocab_size
    generator = torch.Generator().manual_seed(workload.seed)
    rows = workload.total_steps * workload.batch_size * workload.grad_accum * workload.world_size
    if workload.packing and workload.varied_lengths:  # enough rows to fill every packed sequence the run draws
        rows *= -(-workload.packed_length // (-(-workload.source_length // 2) + -(-workload.target_length // 4)))
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
    if not workload.varied_lengths:
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}
    prompts = torch.randint(-(-workload.source_length // 2), workload.source_length + 1, (rows,), generator=generator)
    answers = torch.randint(-(-workload.target_length // 4), workload.target_length + 1, (rows,), generator=generator)
    kept: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for row, (prompt, answer) in enumerate(zip(prompts.tolist(), answers.tolist())):
        # the prompt's end (ChatGLM-6B's [gMASK] <sop>) stays; its start is what varies
        columns = list(range(workload.source_length - prompt, workload.source_length + answer))
        kept["input_ids"].append(ids[row, columns].tolist())
        kept["labels"].append(labels[row, columns].tolist())
    return kept
