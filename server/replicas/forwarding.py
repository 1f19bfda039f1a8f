"""One HTTP request carried from the ingress to a replica, run there through kvmux's own app (ASGI).

The ingress reads the request (it needs the body for the affinity key) and sends it to a replica
as a `ForwardedRequest`; the replica runs its kvmux FastAPI app on it in-process and sends back
`ResponseParts`. A plain response comes back whole, in one part, so a replica that dies before
it finished leaves nothing half-sent; an event stream (SSE) comes back chunk by chunk. When the
caller stops listening (the client left), the app sees `http.disconnect`, as under uvicorn, and
cancels its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmux.server.errors import error_body

Headers = list[tuple[bytes, bytes]]
REPLICA_HEADER = "x-kvmux-replica"  # on every response: the id of the replica that answered
EVENT_STREAM = b"text/event-stream"
# after the caller leaves, the app gets this long to notice the disconnect and cancel its work
DISCONNECT_GRACE_S = 2.0


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it (body read whole)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        """The ASGI scope the replica's app sees."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode("latin-1", "replace"),
            "root_path": "",
            "query_string": self.query_string,
            "headers": [(k.lower(), v) for k, v in self.headers],
            "client": self.client,
            "server": None,
            "state": {},
        }


@dataclass(frozen=True)
class ResponsePart:
    """A piece of the replica's response; the first carries the status and headers."""

    body: bytes
    more: bool  # more parts follow (an event stream)
    status: int | None = None
    headers: Headers | None = None


def is_event_stream(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(EVENT_STREAM) for k, v in headers)


def internal_error_part() -> ResponsePart:
    body = json.dumps(error_body("The replica failed to answer the request.", "InternalServerError", 500)).encode()
    return ResponsePart(body, False, 500, [(b"content-type", b"application/json")])


async def run_asgi(app: Any, request: ForwardedRequest, extra_headers: Headers = ()) -> AsyncIterator[ResponsePart]:
    """Run `request` through the ASGI `app`, yielding its response (whole, or chunk by chunk for SSE).

    `extra_headers` are added to the response. Closing the iterator early (the caller left) tells
    the app the client disconnected and, after DISCONNECT_GRACE_S, cancels it.
    """
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        async for part in _parts(messages, list(extra_headers)):
            yield part
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # an app failure after its answer went out was logged by the app


async def _parts(messages: asyncio.Queue[dict[str, Any] | None], extra_headers: Headers) -> AsyncIterator[ResponsePart]:
    """Group the app's ASGI messages into ResponseParts."""
    status: int | None = None
    headers: Headers = []
    streaming, first = False, True
    pending = bytearray()
    while True:
        message = await messages.get()
        if message is None:  # the app returned (or failed) before finishing its response
            if status is None:
                yield internal_error_part()
            elif not streaming:
                yield ResponsePart(bytes(pending), False, status, headers)
            return
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [*message.get("headers", []), *extra_headers]
            streaming = is_event_stream(headers)
            continue
        if message["type"] != "http.response.body" or status is None:
            continue
        body, more = message.get("body", b""), message.get("more_body", False)
        if streaming:
            yield ResponsePart(body, more, status if first else None, headers if first else None)
            first = False
        else:
            pending += body
            if not more:
                yield ResponsePart(bytes(pending), False, status, headers)
        if not more:
            return
