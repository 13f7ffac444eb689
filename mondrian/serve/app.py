"""The HTTP app: the Service behind FastAPI (routes: mondrian.serve.http), served by uvicorn."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from mondrian.serve import http
from mondrian.serve.errors import ServiceError
from mondrian.serve.guards import BodyGuard, CatchAll
from mondrian.serve.service import Service


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving `service`: its routes get it from `app.state.service`."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # uvicorn re-raises SIGTERM after shutdown: close here, not after run()

    app = FastAPI(title="mondrian advisor service", lifespan=lifespan)
    app.state.service = service
    app.add_exception_handler(ServiceError, http.service_error_handler)
    app.add_exception_handler(RequestValidationError, http.validation_error_handler)
    # outermost last: CatchAll sees everything, including the body guard's refusals
    app.add_middleware(BodyGuard, max_bytes=service.cfg.max_body_bytes, timeout_s=service.cfg.body_timeout_s)
    app.add_middleware(CatchAll)
    app.include_router(http.router)
    app.include_router(http.admin_router)
    return app


def run_server(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. `ready(port)` is called once the socket listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts
    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if ready:
        ready(sock.getsockname()[1])
    # uvicorn re-raises the SIGINT/SIGTERM it caught once it has shut down; these handlers take
    # that re-raise, so the shutdown finishes here (service closed, log flushed) and not by signal
    main = threading.current_thread() is threading.main_thread()  # (uvicorn handles no signals elsewhere)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
