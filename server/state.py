"""What the app holds: config, engine, scheduler, readiness; and its middleware (auth, ids, limits)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.errors import error_body
from kvmux.server.metrics import Metrics, install_metrics_route
from kvmux.server.scheduler import Scheduler

log = logging.getLogger("kvmux.access")

PUBLIC_PATHS = {"/health", "/metrics"}


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    scheduler: Scheduler
    metrics: Metrics | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False

    def install_middleware(self, app: FastAPI) -> None:
        if self.config.cors_origins:
            app.add_middleware(
                CORSMiddleware, allow_origins=self.config.cors_origins, allow_methods=["*"], allow_headers=["*"]
            )
        # pure ASGI (not @app.middleware): handlers must still see the client's disconnect
        app.add_middleware(RequestContextMiddleware, state=self)

    def authorized(self, path: str, authorization: str) -> bool:
        keys = self.config.api_keys
        if not keys:
            return True
        protected = (
            path.startswith("/v1/")
            or path in {"/tokenize", "/detokenize"}
            or (path in PUBLIC_PATHS and self.config.auth_health_and_metrics)
        )
        if not protected:
            return True
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip(), key) for key in keys)

    def install_extra_routes(self, app: FastAPI) -> None:
        """Routes beyond the OpenAI surface: Prometheus metrics."""
        if self.metrics is not None:
            scheduler = self.scheduler
            install_metrics_route(app, self.metrics, lambda: (scheduler.num_running, scheduler.num_waiting))


class RequestContextMiddleware:
    """Request id (X-Request-Id honoured or generated, and returned), body-size limit, API keys,
    and one structured access-log line per request."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        config = self.state.config
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_request_body_bytes:
            message = f"The request body is larger than {config.max_request_body_bytes} bytes."
            response = JSONResponse(error_body(message, "BadRequestError", 413), status_code=413)
            await response(scope, receive, send_with_id)
        elif not self.state.authorized(scope["path"], headers.get("authorization", "")):
            message = "Missing or invalid API key (send 'Authorization: Bearer <key>')."
            response = JSONResponse(error_body(message, "AuthenticationError", 401), status_code=401)
            await response(scope, receive, send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
        log.info(
            "request_id=%s method=%s path=%s status=%s duration_ms=%.1f",
            request_id,
            scope.get("method"),
            scope["path"],
            status["code"],
            (time.perf_counter() - started) * 1000,
        )
