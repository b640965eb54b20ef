"""Batched generation shared by concurrent requests.

One worker thread owns the model. Requests that arrive together (within ``batch_wait_s`` of the
first, up to ``max_batch_size``) are left-padded into one batch and decoded step by step on the
KV cache; each row samples with its own settings and stops on its own (a stop token, a stop
string, its token limit, or its client going away), and its text streams out as it grows.
Requests that arrive while a batch decodes form the next batch.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from glm_portable.errors import GlmPortableError
from glm_portable.modeling.model import preallocated_cache

STOP, LENGTH = "stop", "length"
_UNFINISHED_BYTES = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """How one request generates; ``temperature`` 0 is greedy decoding."""

    max_new_tokens: int
    temperature: float = 0.8
    top_p: float = 0.8
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a request's consumer receives: new text, and once done the finish reason and token count."""

    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: int = 0
    error: Optional[BaseException] = None


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: the engine drops the row at its next step, freeing the slot."""
        self.cancelled.set()


class EngineStopped(GlmPortableError):
    """The server is shutting down and takes no new requests."""


class _Row:
    """One request's decoding state inside a batch."""

    def __init__(self, request: Request, tokenizer, device: torch.device) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""
        self.done = False
        self.generator = torch.Generator(device=device)
        seed = request.sampling.seed
        self.generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))

    def add(self, token: int, stop_ids: Sequence[int]) -> None:
        sampling = self.request.sampling
        if token in stop_ids:
            self._finish(self._text(), STOP, len(self.ids) + 1)
            return
        self.ids.append(token)
        text = self._text()
        cut = _first_stop(text, sampling.stop)
        if cut is not None:
            self._finish(text[:cut], STOP, len(self.ids))
        elif len(self.ids) >= sampling.max_new_tokens:
            self._finish(text, LENGTH, len(self.ids))
        else:
            self._emit(text[:_safe_end(text, sampling.stop)])

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids).lstrip()

    def _emit(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.request.deliver(Event(text[len(self.shown):]))
            self.shown = text

    def _finish(self, text: str, reason: str, tokens: int) -> None:
        text = text.rstrip()
        delta = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.done = True
        self.request.deliver(Event(delta, reason, tokens))


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown: not a partly decoded character, not trailing whitespace
    (the final answer is stripped), not a tail that may be the start of a stop string."""
    end = _trimmed(text, len(text))
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return _trimmed(text, end)


def _trimmed(text: str, end: int) -> int:
    while end and (text[end - 1].isspace() or text[end - 1] == _UNFINISHED_BYTES):
        end -= 1
    return end


def returned_cache(output) -> object:
    """A forward pass's cache, under its name before transformers 5.24 (``past_key_values``) or after (``cache``)."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def choose_tokens(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """The next token of each row: argmax for greedy rows, top-p sampling at the row's temperature otherwise."""
    greedy = logits.argmax(-1).tolist()
    chosen = []
    for index, row in enumerate(rows):
        sampling = row.request.sampling
        if row.done or sampling.temperature == 0:
            chosen.append(greedy[index])
            continue
        probs = torch.softmax(logits[index] / sampling.temperature, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=row.generator)
        chosen.append(int(order[pick]))
    return chosen


class GenerationEngine:
    """The worker thread and its queue; ``submit`` from any thread, ``stop`` to shut down."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 16, batch_wait_s: float = 0.005,
                 static_cache: bool = False) -> None:
        """``static_cache``: decode each batch on a preallocated cache (one shape every step) where the model can."""
        self.model = model.eval()
        self.static_cache = static_cache
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.device = next(model.parameters()).device
        self._queue: "queue.Queue[Optional[Request]]" = queue.Queue()
        self._stopping = threading.Event()
        self.active = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="glm-portable-generation", daemon=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> "GenerationEngine":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        if self._stopping.is_set():
            raise EngineStopped("the server is shutting down")
        self._queue.put(request)

    def stop(self) -> None:
        """Finish the batch in flight, refuse queued requests, end the thread."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)
        self._drain()

    def _next_batch(self) -> list[Request]:
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                request = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if request is None:
                self._stopping.set()
                break
            batch.append(request)
        return [r for r in batch if not r.cancelled.is_set()]

    def _drain(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.deliver(Event(error=EngineStopped("the server is shutting down")))

    def _run(self, requests: list[Request]) -> None:
        self.active = len(requests)
        self.batches += 1
        try:
            self._decode(requests)
        except Exception as exc:  # reported to every client of the batch; the server keeps serving
            for request in requests:
                request.deliver(Event(error=exc))
        finally:
            self.active = 0

    @torch.inference_mode()
    def _decode(self, requests: list[Request]) -> None:
        rows = [_Row(r, self.tokenizer, self.device) for r in requests]
        stop_ids = self.tokenizer.stop_ids
        batch = {k: v.to(self.device) for k, v in self.tokenizer.pad([r.prompt_ids for r in requests]).items()}
        input_ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        next_positions = self.tokenizer.advance_positions(positions)
        steps = max(r.sampling.max_new_tokens for r in requests)
        past = preallocated_cache(self.model, input_ids.shape[1] + steps) if self.static_cache else None
        for _ in range(steps):
            if self._stopping.is_set():
                raise EngineStopped("the server shut down during generation")
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=past, use_cache=True)
            past = returned_cache(out)
            for row in rows:
                if not row.done and row.request.cancelled.is_set():
                    row.done = True
            tokens = choose_tokens(out.logits[:, -1].float(), rows)
            for row, token in zip(rows, tokens):
                if not row.done:
                    row.add(token, stop_ids)
            if all(row.done for row in rows):
                return
            input_ids = torch.tensor(tokens, device=self.device).view(-1, 1)
            mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=-1)
            positions, next_positions = next_positions, self.tokenizer.advance_positions(next_positions)
