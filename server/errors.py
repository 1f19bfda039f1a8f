"""kvmux's error hierarchy and its OpenAI-shaped rendering `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("kvmux.server")

# The id of the request being served (set by the request middleware; returned as X-Request-Id).
REQUEST_ID: ContextVar[str | None] = ContextVar("kvmux_request_id", default=None)


class KvmuxError(Exception):
    """An error a client should see, with its HTTP status and the offending parameter."""

    status = 400
    error_type = "BadRequestError"

    def __init__(self, message: str, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status


class RequestError(KvmuxError):
    """Invalid input (400)."""


class ModelNotServedError(KvmuxError):
    status = 404
    error_type = "NotFoundError"


class AuthError(KvmuxError):
    status = 401
    error_type = "AuthenticationError"


class OverloadedError(KvmuxError):
    """Too many queued requests (429) — the client should retry later."""

    status = 429
    error_type = "RateLimitError"


class UnavailableError(KvmuxError):
    """The server cannot take the request now (503): shutting down, not ready, out of KV memory."""

    status = 503
    error_type = "ServiceUnavailableError"


class DeadlineError(KvmuxError):
    status = 408
    error_type = "TimeoutError"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _ADDRESS.sub("", message), "type": error_type, "param": param, "code": status}}


def to_error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) for any exception raised while serving a request."""
    from kvmux.policies.base import PolicyInputError
    from kvmux.policies.presets import PresetError

    if isinstance(exc, KvmuxError):
        return exc.status, error_body(exc.message, exc.error_type, exc.status, exc.param)
    if isinstance(exc, (PresetError, PolicyInputError)):
        return 400, error_body(exc.message, "BadRequestError", 400, exc.param)
    # an unexpected failure: the details go to the log, never to the client
    request_id = REQUEST_ID.get()
    log.error("request_id=%s internal error", request_id, exc_info=exc)
    message = "The server had an internal error while processing the request"
    message += f" (request id {request_id})." if request_id else "."
    return 500, error_body(message, "InternalServerError", 500)
