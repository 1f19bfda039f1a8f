"""kvmux's one error hierarchy: every error a client should see carries (message, param, HTTP status).

Policies, presets, the engine and the server raise these; the server renders any of them in the
OpenAI error shape (`kvmux.server.errors`). Anything else that escapes is an internal error (500).
"""

from __future__ import annotations


class KvmuxError(Exception):
    """An error a client should see, with its HTTP status and the offending parameter."""

    status = 400
    error_type = "BadRequestError"
    default_param: str | None = None

    def __init__(self, message: str, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param if param is not None else self.default_param
        if status is not None:
            self.status = status


class RequestError(KvmuxError):
    """Invalid input (400)."""


class PresetError(RequestError, ValueError):
    """A preset file or a request's policy selection is invalid (400 for a request; fatal at start-up)."""


class PolicyInputError(RequestError, ValueError):
    """The request cannot be served by its policy (400), e.g. no usable question."""

    default_param = "kv_policy"


class ModelNotServedError(KvmuxError):
    status = 404
    error_type = "NotFoundError"


class AuthError(KvmuxError):
    status = 401
    error_type = "AuthenticationError"


class OverloadedError(KvmuxError):
    """Too many queued requests (429): the client should retry later."""

    status = 429
    error_type = "RateLimitError"


class UnavailableError(KvmuxError):
    """The server cannot take the request now (503): shutting down, not ready, out of KV memory."""

    status = 503
    error_type = "ServiceUnavailableError"


class DeadlineError(KvmuxError):
    status = 408
    error_type = "TimeoutError"
