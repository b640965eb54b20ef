"""Chat helpers for ChatGLM2/3: one-shot and streaming answers with message history."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from queue import Queue
from typing import Iterator, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from glm_portable.errors import UserError

from .model import ChatGLMForConditionalGeneration
from .prompts import Message, chat_input_ids
from .tokenizer import ChatGLMTokenizer


@dataclass
class GenerationSettings:
    """How to generate; the defaults are ChatGLM2/3's chat defaults (sampling, top_p 0.8, temperature 0.8).

    ``seed`` (when sampling) makes sampled output repeatable.
    """

    max_new_tokens: int = 256
    do_sample: bool = True
    top_p: float = 0.8
    temperature: float = 0.8
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """One UserError for settings generation cannot use (before a model is loaded for them)."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise UserError(f"--temperature must be positive when sampling, got {self.temperature} (use --greedy "
                            "for deterministic answers)")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self, tokenizer: ChatGLMTokenizer) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_token_id, **self.extra}
        if self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        return kwargs


def _inputs(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, query: str,
            history: Sequence[Message]) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad([chat_input_ids(tokenizer, query, history)])
    device = model.get_input_embeddings().weight.device
    return {k: v.to(device) for k, v in batch.items()}


def _updated(history: Sequence[Message], query: str, response: str) -> list[Message]:
    return [*history, {"role": "user", "content": query}, {"role": "assistant", "content": response}]


@torch.inference_mode()
def chat(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, query: str,
         history: Sequence[Message] = (), settings: Optional[GenerationSettings] = None) -> tuple[str, list[Message]]:
    """Answer ``query`` given ``history``; returns the answer and the history with this turn appended."""
    settings = settings or GenerationSettings()
    inputs = _inputs(model, tokenizer, query, history)
    output = model.generate(**inputs, **settings.generate_kwargs(tokenizer))
    response = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]).strip()
    return response, _updated(history, query, response)


class _QueueStreamer:
    """transformers' streamer protocol (put / end), forwarding new token ids to a queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _WhenSet(StoppingCriteria):
    """Stops every row once the event is set: how a caller ends a streamed answer early."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_chat(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer, query: str,
                history: Sequence[Message] = (), settings: Optional[GenerationSettings] = None
                ) -> Iterator[tuple[str, list[Message]]]:
    """Yield the growing answer (and the would-be history) as tokens arrive; generation runs in a thread."""
    settings = settings or GenerationSettings()
    inputs = _inputs(model, tokenizer, query, history)
    queue: Queue = Queue()
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, **settings.generate_kwargs(tokenizer), streamer=_QueueStreamer(queue),
                               stopping_criteria=StoppingCriteriaList([_WhenSet(stop)]))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            queue.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    ids: list[int] = []
    shown = ""
    try:
        while (chunk := queue.get()) is not None:
            ids += chunk
            text = tokenizer.decode(ids).strip()
            if text != shown and not text.endswith("\ufffd"):
                shown = text
                yield text, _updated(history, query, text)
    finally:  # also when the caller stops early (Ctrl-C, a closed generator): end the generation thread first
        stop.set()
        worker.join()
    if errors:
        raise errors[0]
    final = tokenizer.decode(ids).strip()
    if final != shown:
        yield final, _updated(history, query, final)
