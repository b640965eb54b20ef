"""``glm-portable serve``: load the model once, start the generation engine, run uvicorn until a signal."""

from __future__ import annotations

import signal
import socket
from contextlib import contextmanager
from typing import Callable, Iterator

from glm_portable.backends import select_backend
from glm_portable.errors import UserError
from glm_portable.evaluation import load_for_inference
from glm_portable.modeling import load_tokenizer
from glm_portable.process import start_process

from .api import ServerSettings, create_app
from .engine import GenerationEngine
from .options import ServeOptions

GRACEFUL_SHUTDOWN_S = 5


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that port 0 resolves to a known port."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from None
    return sock


def serve(options: ServeOptions, on_ready: Callable[[str, str], None]) -> None:
    """Serve until SIGINT / SIGTERM; ``on_ready(url, description)`` once the port accepts connections.

    Shutdown stops taking requests, gives open streams a few seconds, then stops the engine.
    """
    import uvicorn

    selection = select_backend(options.device)
    start_process(selection.backend)
    tokenizer = load_tokenizer(options.model)
    model = load_for_inference(options.model, options.checkpoint, selection.backend, options.dtype, options.impl,
                               options.quantization_bit)
    cache = options.cache or selection.backend.default_cache()
    engine = GenerationEngine(model, tokenizer, options.max_batch_size, options.batch_wait_ms / 1000,
                              static_cache=cache == "static")
    settings = ServerSettings(model_name=options.served_name(), max_new_tokens=options.max_new_tokens,
                              temperature=options.temperature, top_p=options.top_p,
                              max_length=getattr(model.config, "seq_length", None), api_key=options.api_key)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(create_app(engine, settings), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    engine.start()
    try:
        on_ready(url, f"{settings.model_name} ({tokenizer.family}, {options.impl}) on {selection.backend.name}, "
                      f"up to {options.max_batch_size} requests a batch")
        with _stop_signals_end_quietly():
            server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


@contextmanager
def _stop_signals_end_quietly() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the handler that
    was there before it; a no-op handler there makes a requested stop end the command normally (exit 0)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
