"""The OpenAI-compatible HTTP API and the chat page, over one ``GenerationEngine``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain or server-sent events),
``GET /health`` and the page at ``/``. Errors have OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for a request that cannot be answered (malformed JSON, unknown role, no
messages, a prompt beyond the model's limit), 401 for a missing or wrong key, 404 for another
model's name, 422 for a field of the wrong type or range.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .engine import Event, GenerationEngine, Sampling
from .engine import Request as EngineRequest
from .messages import MessageError, prompt_ids


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; fields this server does not use (``user``, penalties, …) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    messages: list[ChatMessage]
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)


@dataclass
class ServerSettings:
    """What the server answers with when a request leaves a field out, and its limits."""

    model_name: str
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.8
    max_length: Optional[int] = None
    api_key: Optional[str] = None


class _Delivery:
    """Carries the engine thread's events onto the event loop of the request that waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: the client is long gone
            pass

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return


def create_app(engine: GenerationEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI application; the caller owns the engine's start and stop."""
    app = FastAPI(title="glm-portable", docs_url=None, redoc_url=None)
    page = resources.files("glm_portable.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {first.get('msg')}", code="json_invalid").response()
        param = ".".join(location) or None
        if first.get("type") == "missing" and param == "messages":
            return ApiError(400, "messages is required", "messages", "missing").response()
        return ApiError(422, f"{param or 'body'}: {first.get('msg')}", param, first.get("type")).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error").response()

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "active": engine.active, "queued": engine.queued,
                "batches": engine.batches, "auth": settings.api_key is not None,
                "max_new_tokens": settings.max_new_tokens}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "glm-portable"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest):
        request, prompt_tokens = _engine_request(body, settings, engine)
        delivery = _Delivery(asyncio.get_running_loop())
        request.deliver = delivery
        engine.submit(request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(request, delivery, ident, created, settings.model_name, prompt_tokens, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = "", Event()
        try:
            async for last in delivery.events():
                text += last.text
        finally:
            request.cancel()
        return {"id": ident, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason}],
                "usage": _usage(prompt_tokens, last.completion_tokens)}

    return app


def _engine_request(body: ChatCompletionRequest, settings: ServerSettings,
                    engine: GenerationEngine) -> tuple[EngineRequest, int]:
    if body.model is not None and body.model != settings.model_name:
        raise ApiError(404, f"the model {body.model!r} is not served here (this server serves "
                            f"{settings.model_name!r})", "model", "model_not_found")
    try:
        ids = prompt_ids(engine.tokenizer, [m.model_dump() for m in body.messages])
    except MessageError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    wanted = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if wanted > settings.max_new_tokens:
        raise ApiError(400, f"{param} {wanted} is more than this server allows ({settings.max_new_tokens}, "
                            "its --max-new-tokens)", param)
    if settings.max_length is not None and len(ids) + wanted > settings.max_length:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; with {param} {wanted} that exceeds the model's limit "
                            f"of {settings.max_length} tokens", "messages", "context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = Sampling(max_new_tokens=wanted,
                        temperature=settings.temperature if body.temperature is None else body.temperature,
                        top_p=settings.top_p if body.top_p is None else body.top_p,
                        seed=body.seed, stop=tuple(s for s in stops if s))
    return EngineRequest(ids, sampling, deliver=lambda _: None), len(ids)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(request: EngineRequest, delivery: _Delivery, ident: str, created: int, model: str,
               prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Chunks as server-sent events: the role, content deltas, the finish reason, optional usage, [DONE]."""
    def chunk(delta: dict[str, Any], finish: Optional[str] = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for event in delivery.events():
                if event.text:
                    yield chunk({"content": event.text})
                if event.finish_reason is not None:
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        usage = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [], "usage": _usage(prompt_tokens, event.completion_tokens)}
                        yield f"data: {json.dumps(usage)}\n\n"
        except Exception as exc:  # the stream has started: the error travels in it
            yield f"data: {json.dumps(error_body(str(exc), 'server_error'), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()
