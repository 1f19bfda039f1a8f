"""kvmux errors in the OpenAI shape `{"error": {message, type, param, code}}` (the hierarchy: `kvmux.errors`)."""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any

from kvmux.errors import KvmuxError

log = logging.getLogger("kvmux.server")

# The id of the request being served (set by the request middleware; returned as X-Request-Id).
REQUEST_ID: ContextVar[str | None] = ContextVar("kvmux_request_id", default=None)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _ADDRESS.sub("", message), "type": error_type, "param": param, "code": status}}


def to_error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) for any exception raised while serving a request."""
    if isinstance(exc, KvmuxError):
        return exc.status, error_body(exc.message, exc.error_type, exc.status, exc.param)
    # an unexpected failure: the details go to the log, never to the client
    request_id = REQUEST_ID.get()
    log.error("request_id=%s internal error", request_id, exc_info=exc)
    message = "The server had an internal error while processing the request"
    message += f" (request id {request_id})." if request_id else "."
    return 500, error_body(message, "InternalServerError", 500)
