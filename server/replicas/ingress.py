"""The HTTP entry of replicated kvmux: reads each request, takes its cache-affinity key, and lets Serve route it.

Serve's proxy hands a deployment the request's headers but not its body, and the affinity key
may come from the body (the prompt's first block). So this light deployment (no model) reads
the body, computes the key (`affinity.affinity_key`) and calls a kvmux replica through a
deployment handle whose `session_id` is the key: Serve's router (`router.KvmuxAffinityRouter`)
picks the replica. Everything else stays the replica's: routes, validation, auth, errors.

What the entry answers itself: 413/408 for a body over `max_request_body_bytes` or slower than
`request_body_timeout_s` (it reads the body first); 429 when every replica is full and Serve's
queue too (`BackPressureError`); 503 when the replica serving a request died (Serve replaces
it); mid-stream, that 503 is an SSE error event followed by `[DONE]`, as kvmux sends any error
after the headers went out. `GET /metrics` merges every replica's metrics, each series labelled
with its replica.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from kvmux.server.errors import REQUEST_ID, error_body, to_error_body
from kvmux.server.replicas.affinity import Affinity, affinity_key
from kvmux.server.replicas.forwarding import REPLICA_HEADER, ForwardedRequest, ResponsePart
from kvmux.server.replicas.metrics_merge import merge_expositions
from kvmux.server.replicas.router import PIN_PREFIX, replica_ids

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
DROPPED_HEADERS = {b"x-request-id"}  # Serve's proxy adds its own (the same id, forwarded to the replica)
METRICS_TIMEOUT_S = 5.0  # a replica that does not answer a scrape in this time is left out of it
REPLICA_GONE = "The replica serving this request stopped; Serve is replacing it. Retry the request."
ALL_BUSY = "Every replica is busy and the queue is full; retry later."
# the messages of kvmux's own body limits (server/state.py), repeated so that this module needs no
# model code: the entry imports neither torch nor transformers
TOO_LARGE = "The request body is larger than {limit} bytes."
TOO_SLOW = "The request body did not arrive within {timeout_s:g} s."


@dataclass(frozen=True)
class IngressSettings:
    """What the entry needs from the server config."""

    affinity: Affinity
    prefix_chars: int
    max_body_bytes: int
    body_timeout_s: float


GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def replica_gone(exc: BaseException) -> bool:
    """Whether a call failed because its replica died or cannot be reached (also when Ray wraps that error)."""
    return isinstance(exc, GONE) or isinstance(getattr(exc, "cause", None), GONE)


def failure(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an exception from a replica call."""
    if isinstance(exc, BackPressureError):
        return 429, error_body(ALL_BUSY, "RateLimitError", 429)
    if replica_gone(exc):
        return 503, error_body(REPLICA_GONE, "ServiceUnavailableError", 503)
    return to_error_body(exc)


def failure_response(exc: BaseException) -> Response:
    if isinstance(exc, RequestCancelledError):
        return Response(status_code=499)
    status, body = failure(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


async def read_forwarded(request: Request, settings: IngressSettings) -> ForwardedRequest | Response:
    """The request with its body (limits as kvmux's own: 413 past the size, 408 past the deadline)."""
    limit = settings.max_body_bytes
    length = request.headers.get("content-length", "")
    too_large = JSONResponse(error_body(TOO_LARGE.format(limit=limit), "BadRequestError", 413), status_code=413)
    if length.isdigit() and int(length) > limit:
        return too_large
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return too_large
    except TimeoutError:
        slow = TOO_SLOW.format(timeout_s=settings.body_timeout_s)
        return JSONResponse(error_body(slow, "TimeoutError", 408), status_code=408)
    scope = request.scope
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    client = tuple(scope["client"]) if scope.get("client") else None
    return ForwardedRequest(
        scope["method"], path, scope.get("query_string", b""), list(scope["headers"]), bytes(body), client
    )


def forwarded_response(first: ResponsePart, stream: DeploymentResponseGenerator | None) -> Response:
    """The client's response: whole, or streamed on from the replica's remaining parts."""
    headers = [(k, v) for k, v in first.headers or [] if k.lower() not in DROPPED_HEADERS]
    if first.more and stream is not None:
        response: Response = StreamingResponse(rest_of_stream(first, stream), status_code=first.status or 200)
    else:
        response = Response(first.body, status_code=first.status or 200)
    response.raw_headers = headers
    return response


async def rest_of_stream(first: ResponsePart, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    finished = False
    try:
        yield first.body
        async for part in stream:
            yield part.body
        finished = True
    except Exception as exc:  # noqa: BLE001 - after the headers went out: an error event, then [DONE]
        yield f"data: {json.dumps(failure(exc)[1])}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:
            stream.cancel()


class Ingress:
    """Routes every request to a kvmux replica, by affinity key when it has one (deployed as KvmuxIngress)."""

    def __init__(self, replicas: DeploymentHandle, settings: IngressSettings):
        self.replicas = replicas
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The entry's app, built in its replica (its own docs routes off: the replicas answer /docs)."""
        app = FastAPI(title="kvmux", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/metrics", self.metrics, methods=["GET"], include_in_schema=False)
        app.add_api_route("/{path:path}", self.forward, methods=METHODS, include_in_schema=False)
        return app

    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics in one exposition (each series labelled with its replica)."""
        forwarded = ForwardedRequest("GET", "/metrics", b"", list(request.scope["headers"]))
        ids = await asyncio.to_thread(replica_ids, self.replicas.app_name, self.replicas.deployment_name)
        answers: list[ResponsePart | BaseException] = []
        for replica_id in ids:  # one at a time: calls made within one request share its request id
            try:
                answers.append(await self.first_part(forwarded, PIN_PREFIX + replica_id))
            except Exception as exc:  # noqa: BLE001 - a replica that cannot answer is left out of this scrape
                answers.append(exc)
        texts: dict[str, str] = {}
        for part in answers:
            if not isinstance(part, ResponsePart):
                continue
            if part.status != 200:  # e.g. 401 without the key the replicas require
                return forwarded_response(part, None)
            replica = dict(part.headers or []).get(REPLICA_HEADER.encode(), b"").decode()
            texts[replica] = part.body.decode()
        if not texts:
            return failure_response(ReplicaUnavailableError("no replica answered"))
        return Response(merge_expositions(texts.values()), media_type=CONTENT_TYPE_LATEST)

    async def forward(self, request: Request) -> Response:
        forwarded = await read_forwarded(request, self.settings)
        if isinstance(forwarded, Response):
            return forwarded
        REQUEST_ID.set(request.headers.get("x-request-id"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in forwarded.headers}
        key = affinity_key(headers, forwarded.body, self.settings.affinity, self.settings.prefix_chars)
        stream = self.call(forwarded, key)
        try:
            first = await anext(stream)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure before the answer started is a whole error response
            stream.cancel()
            return failure_response(exc)
        return forwarded_response(first, stream)

    def call(self, forwarded: ForwardedRequest, key: str | None) -> DeploymentResponseGenerator:
        handle = self.replicas.options(stream=True, session_id=key) if key else self.replicas.options(stream=True)
        return handle.forward.remote(forwarded)

    async def first_part(self, forwarded: ForwardedRequest, key: str | None) -> ResponsePart:
        """The first (for /metrics: the only) part of a replica's answer, within METRICS_TIMEOUT_S."""
        stream = self.call(forwarded, key)
        try:
            async with asyncio.timeout(METRICS_TIMEOUT_S):
                return await anext(stream)
        except BaseException:
            stream.cancel()
            raise


# decorated apart from the class, so that Ray pickles the class by reference (its module holds it)
KvmuxIngress = serve.deployment(name="KvmuxIngress", ray_actor_options={"num_cpus": 0})(serve.ingress()(Ingress))
