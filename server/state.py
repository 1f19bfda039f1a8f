"""What the app holds: config, engine, scheduler, readiness, a bounded CPU worker pool; and its
middleware (API keys, request ids, body size limit and deadline, errors that escape a route, CORS)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from kvmux.errors import OverloadedError, UnavailableError
from kvmux.server.arena import is_arena_path
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.errors import REQUEST_ID, error_body, to_error_body
from kvmux.server.metrics import Metrics, install_metrics_route
from kvmux.server.scheduler import Scheduler

log = logging.getLogger("kvmux.access")

T = TypeVar("T")

HEALTH_PATHS = {"/health", "/metrics"}
DOCS_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
# Tokenization, chat templates and policies' prompt checks run here, off the event loop. Few
# threads: HF fast tokenizers gain little from more and dislike heavy concurrent use.
CPU_WORKERS = 2
MISSING_KEY = "Missing or invalid API key (send 'Authorization: Bearer <key>')."
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    scheduler: Scheduler
    metrics: Metrics | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    cpu_pool: ThreadPoolExecutor | None = None
    cpu_pending: int = 0  # jobs in or waiting for the worker pool (changed on the event loop only)

    def install_middleware(self, app: FastAPI) -> None:
        # pure ASGI (not @app.middleware): handlers must still see the client's disconnect
        app.add_middleware(RequestContextMiddleware, state=self)
        if self.config.cors_origins:
            # outermost: it answers browser preflights (which carry no API key) and adds CORS
            # headers to every response, 401 and 413 included
            app.add_middleware(
                CORSMiddleware, allow_origins=self.config.cors_origins, allow_methods=["*"], allow_headers=["*"]
            )

    def start_workers(self) -> None:
        self.cpu_pool = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="kvmux-cpu")

    def stop_workers(self) -> None:
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=False, cancel_futures=True)
            self.cpu_pool = None

    @property
    def max_cpu_pending(self) -> int:
        """Jobs the worker pool may hold at once: as many as the scheduler may hold requests."""
        return self.config.max_active_sessions + self.config.max_queued_requests

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-bound request work (tokenizing, rendering, checking) in the worker pool; 429 when
        `max_cpu_pending` jobs are already there, so a flood of large prompts cannot queue without end."""
        if self.cpu_pool is None:
            raise UnavailableError("The server is starting or shutting down; retry later.")
        if self.cpu_pending >= self.max_cpu_pending:
            raise OverloadedError("The server is busy preparing other requests; retry later.")
        self.cpu_pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, lambda: fn(*args, **kwargs))
        finally:
            self.cpu_pending -= 1

    def authorized(self, path: str, authorization: bytes) -> bool:
        keys = self.config.api_keys
        if not keys:
            return True
        if path in HEALTH_PATHS and not self.config.auth_health_and_metrics:
            return True
        if path in DOCS_PATHS and not self.config.auth_docs:
            return True
        if is_arena_path(path):  # the page's files; its API calls carry the key
            return True
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # bytes on both sides: a non-ASCII header value is just a wrong key
        return any(hmac.compare_digest(token, key.encode()) for key in keys)

    def install_extra_routes(self, app: FastAPI) -> None:
        """Routes beyond the OpenAI surface: Prometheus metrics."""
        if self.metrics is not None:
            scheduler = self.scheduler
            install_metrics_route(app, self.metrics, lambda: (scheduler.num_running, scheduler.num_waiting))


class BodyTooLarge(HTTPException):
    """The request body grew past `max_request_body_bytes` while it was being read."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class BodyTooSlow(HTTPException):
    """The request body did not arrive within `request_body_timeout_s` (a stalled or trickling upload)."""

    def __init__(self, timeout_s: float):
        super().__init__(408, f"The request body did not arrive within {timeout_s:g} s.")


class RequestContextMiddleware:
    """Request id (a well-formed X-Request-Id is honoured, else one is generated; returned either
    way), body-size limit (Content-Length and the bytes actually received), body deadline, API keys,
    and one structured access-log line per request."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        limit = self.state.config.max_request_body_bytes
        body_timeout = self.state.config.request_body_timeout_s
        body_deadline = time.monotonic() + body_timeout
        received, body_done = 0, False

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def receive_limited():
            nonlocal received, body_done
            if body_done:  # later calls wait for the client's disconnect, however long that takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(body_deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise BodyTooSlow(body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def reply(message: str, kind: str, code: int) -> None:
            await JSONResponse(error_body(message, kind, code), status_code=code)(scope, receive, send_with_id)

        length = headers.get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > limit:
                await reply(BodyTooLarge(limit).detail, "BadRequestError", 413)
            elif not self.state.authorized(scope["path"], headers.get(b"authorization", b"")):
                await reply(MISSING_KEY, "AuthenticationError", 401)
            else:
                await self.app(scope, receive_limited, send_with_id)
        except (BodyTooLarge, BodyTooSlow) as exc:  # read outside a route's body parsing (a disconnect check)
            if not status["sent"]:
                kind = "BadRequestError" if exc.status_code == 413 else "TimeoutError"
                await reply(exc.detail, kind, exc.status_code)
        except Exception as exc:  # noqa: BLE001 - whatever escaped the routes: logged, answered in OpenAI shape
            if status["sent"]:
                raise
            code, body = to_error_body(exc)
            await JSONResponse(body, status_code=code)(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            log.info(
                "request_id=%s method=%s path=%s status=%s duration_ms=%.1f",
                request_id,
                scope.get("method"),
                scope["path"],
                status["code"],
                (time.perf_counter() - started) * 1000,
            )
