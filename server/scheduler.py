"""The worker thread that runs model forwards, and admission control.

HTTP handlers `submit` a prepared request and read its events from an asyncio queue. The worker
admits requests up to `max_active_sessions`, then interleaves the active ones step by step (one
prefill chunk or one decode token each, round-robin), so a short request finishes while a long
prefill is running. A cancelled request (client gone, deadline passed) is dropped before its
next step and its session's KV cache is released.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvmux.server.engine import Engine, GenerationRequest, RequestState, TokenEvent
from kvmux.server.errors import DeadlineError, OverloadedError, UnavailableError

log = logging.getLogger("kvmux.scheduler")


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

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


@dataclass
class _Active:
    handle: Handle
    state: RequestState
    steps: Any  # the state's step generator


class Scheduler:
    """Owns the worker thread; every model forward happens there."""

    def __init__(
        self,
        engine: Engine,
        max_active_sessions: int = 4,
        max_queued_requests: int = 64,
        on_event: Any = None,
    ):
        self.engine = engine
        self.max_active = max_active_sessions
        self.max_queued = max_queued_requests
        self.on_event = on_event  # metrics hook: on_event(kind, handle, payload)
        self._waiting: deque[Handle] = deque()
        self._active: list[_Active] = []
        self._lock = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="kvmux-worker", daemon=True)
        self.healthy = True

    # -- public API (called from the event loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, deadline_s: float | None = None) -> Handle:
        handle = Handle(request=request, loop=asyncio.get_running_loop())
        if deadline_s:
            handle.deadline = handle.submitted_at + deadline_s
        with self._lock:
            if not self._accepting:
                raise UnavailableError("The server is shutting down and accepts no new requests.")
            if len(self._waiting) >= self.max_queued:
                raise OverloadedError(
                    f"Too many requests are waiting ({len(self._waiting)}); retry shortly.", status=429
                )
            self._waiting.append(handle)
            self._lock.notify()
        self._emit("queued", handle, None)
        return handle

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting, let in-flight work finish for up to `grace_s`, then cancel the rest."""
        self.stop_accepting()
        end = time.monotonic() + grace_s
        while (self._active or self._waiting) and time.monotonic() < end:
            time.sleep(0.05)
        with self._lock:
            for handle in list(self._waiting) + [a.handle for a in self._active]:
                handle.cancel()
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=5.0)

    # -- worker thread ---------------------------------------------------------------------------
    def _emit(self, kind: str, handle: Handle, payload: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, handle, payload)
            except Exception:  # metrics must never break serving
                log.exception("metrics hook failed")

    def _admit(self) -> None:
        with self._lock:
            while not self._active and not self._waiting and not self._stopped:
                self._lock.wait(timeout=0.5)
            while self._waiting and len(self._active) < self.max_active:
                handle = self._waiting.popleft()
                state = self.engine.start(handle.request)
                handle.state = state
                self._active.append(_Active(handle, state, state.steps()))
                self._emit("started", handle, None)

    def _loop(self) -> None:
        while not self._stopped:
            self._admit()
            for active in list(self._active):
                self._step(active)

    def _finish(self, active: _Active, kind: str, payload: Any) -> None:
        self._active.remove(active)
        active.steps.close()  # releases the session's cache if it is still open
        active.handle.push(kind, payload)
        self._emit(kind, active.handle, payload)

    def _step(self, active: _Active) -> None:
        handle = active.handle
        if handle.cancelled.is_set():
            self._finish(active, "cancelled", None)
            return
        if handle.deadline is not None and time.monotonic() > handle.deadline:
            self._finish(active, "error", DeadlineError("The request exceeded its deadline and was stopped."))
            return
        try:
            event = next(active.steps)
        except StopIteration:
            self._finish(active, "done", active.state.kv_stats())
            return
        except Exception as exc:  # a failing request must not take the server down
            log.exception("request %s failed", handle.request.request_id)
            self._finish(active, "error", exc)
            return
        if isinstance(event, TokenEvent):
            handle.push("token", event)
            self._emit("token", handle, event)
            if event.finish_reason is not None:
                self._finish(active, "done", active.state.kv_stats())
