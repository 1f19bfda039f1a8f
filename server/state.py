"""What the app holds: config, engine, scheduler, readiness; and its middleware (auth, ids, limits)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.errors import error_body
from kvmux.server.metrics import Metrics, install_metrics_route
from kvmux.server.scheduler import Scheduler
from starlette.requests import Request
from starlette.responses import JSONResponse

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
        config = self.config
        if config.cors_origins:
            app.add_middleware(
                CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"]
            )

        @app.middleware("http")
        async def request_context(request: Request, call_next):
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            started = time.perf_counter()
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > config.max_request_body_bytes:
                response = JSONResponse(
                    error_body(
                        f"The request body is larger than {config.max_request_body_bytes} bytes.",
                        "BadRequestError",
                        413,
                    ),
                    status_code=413,
                )
            elif not self._authorized(request):
                response = JSONResponse(
                    error_body(
                        "Missing or invalid API key (send 'Authorization: Bearer <key>').", "AuthenticationError", 401
                    ),
                    status_code=401,
                )
            else:
                response = await call_next(request)
            response.headers["X-Request-Id"] = request_id
            log.info(
                "request_id=%s method=%s path=%s status=%s duration_ms=%.1f",
                request_id,
                request.method,
                request.url.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
            return response

    def _authorized(self, request: Request) -> bool:
        keys = self.config.api_keys
        if not keys:
            return True
        path = request.url.path
        protected = (
            path.startswith("/v1/")
            or path in {"/tokenize", "/detokenize"}
            or (path in PUBLIC_PATHS and self.config.auth_health_and_metrics)
        )
        if not protected:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.strip(), key) for key in keys)

    def install_extra_routes(self, app: FastAPI) -> None:
        """Routes beyond the OpenAI surface: Prometheus metrics."""
        if self.metrics is not None:
            scheduler = self.scheduler
            install_metrics_route(app, self.metrics, lambda: (scheduler.num_running, scheduler.num_waiting))
