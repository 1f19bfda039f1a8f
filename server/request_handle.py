"""A submitted request as each side of the scheduler sees it.

`Handle` is the HTTP side's view: the asyncio queue its events arrive on, the flag that cancels
it, its deadline. `ActiveRequest` is the worker's record of a running request: its step
coroutine, the KV reserved for it and the decode forward it waits for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvmux.errors import DeadlineError, KvmuxError
from kvmux.server.engine import GenerationRequest, NeedDecode, RequestState


@dataclass
class Handle:
    """The HTTP side's view of a submitted request."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    state: RequestState | None = None
    wake: asyncio.Event | None = None  # set on every event (one Event may serve several handles)
    stop_reason: KvmuxError | None = None  # why the server (not the client) stopped it

    def cancel(self, reason: KvmuxError | None = None) -> None:
        if reason is not None and not self.cancelled.is_set():
            self.stop_reason = reason
        self.cancelled.set()

    def should_stop(self) -> bool:
        """True once the request is cancelled or past its deadline (checked between layers)."""
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def stopped_outcome(self) -> tuple[str, Any]:
        """The event that ends a request stopped by `should_stop`: why the server stopped it, the
        client's cancel, or its deadline."""
        if self.stop_reason is not None:
            return "error", self.stop_reason
        if self.cancelled.is_set():
            return "cancelled", None
        return "error", DeadlineError("The request exceeded its deadline and was stopped.")

    def push(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _deliver(self, item: tuple[str, Any]) -> None:
        self.events.put_nowait(item)
        if self.wake is not None:
            self.wake.set()


@dataclass
class ActiveRequest:
    """The worker's record of a running request."""

    handle: Handle
    state: RequestState
    steps: Any  # the state's step coroutine
    kv_bytes: int = 0  # KV reserved for it under the memory budget
    reply: Any = None  # logits to send into the coroutine at its next step
    wants: NeedDecode | None = None  # a decode forward it is waiting for
