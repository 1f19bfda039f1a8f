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

from kvmux.server.engine import Engine, GenerationRequest, NeedDecode, RequestState, TokenEvent
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
    steps: Any  # the state's step coroutine
    kv_bytes: int = 0  # KV reserved for it under the memory budget
    reply: Any = None  # logits to send into the coroutine at its next step
    wants: NeedDecode | None = None  # a decode forward it is waiting for


class Scheduler:
    """Owns the worker thread; every model forward happens there."""

    def __init__(
        self,
        engine: Engine,
        max_active_sessions: int = 4,
        max_queued_requests: int = 64,
        on_event: Any = None,
        kv_memory_budget_bytes: int | None = None,
        batch_decode: bool = True,
    ):
        self.engine = engine
        self.max_active = max_active_sessions
        self.max_queued = max_queued_requests
        self.on_event = on_event  # metrics hook: on_event(kind, handle, payload)
        self.kv_budget = kv_memory_budget_bytes
        self.kv_reserved = 0
        self.batch_decode = batch_decode
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
        needed = self.kv_bytes_needed(request)
        if self.kv_budget is not None and needed > self.kv_budget:
            raise UnavailableError(
                f"The request needs about {needed} bytes of KV cache with preset '{request.preset.name}', more "
                f"than this server's KV memory budget of {self.kv_budget} bytes; shorten it or pick a policy "
                "that keeps less.",
                status=503,
            )
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

    def kv_bytes_needed(self, request: GenerationRequest) -> int:
        preset = request.preset
        tokens = len(request.prompt_ids) + request.sampling.max_tokens
        return preset.policy.kv_bytes_needed(preset.params, self.engine.info, tokens)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting

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
                handle = self._waiting[0]
                needed = self.kv_bytes_needed(handle.request)
                if self.kv_budget is not None and self._active and self.kv_reserved + needed > self.kv_budget:
                    break  # waits (in order) until running requests release their KV
                self._waiting.popleft()
                if handle.cancelled.is_set():
                    handle.push("cancelled", None)
                    self._emit("cancelled", handle, None)
                    continue
                state = self.engine.start(handle.request)
                handle.state = state
                self.kv_reserved += needed
                self._active.append(_Active(handle, state, state.steps(), kv_bytes=needed))
                self._emit("started", handle, None)

    def _loop(self) -> None:
        while not self._stopped:
            self._admit()
            for active in list(self._active):
                self._step(active)
            self._run_decodes()

    def _run_decodes(self) -> None:
        """Answer every pending NeedDecode: batchable sessions share one forward."""
        waiting = [a for a in self._active if a.wants is not None]
        batch = [a for a in waiting if self.batch_decode and a.state.request.preset.policy.batched_decode]
        if len(batch) < 2:
            batch = []
        singles = [a for a in waiting if a not in batch]
        runner = self.engine.runner
        try:
            if batch:
                logits = runner.decode_batch([a.wants.session for a in batch], [a.wants.token for a in batch])
                for row, active in enumerate(batch):
                    active.reply, active.wants = logits[row], None
        except Exception as exc:  # noqa: BLE001
            log.exception("batched decode failed")
            for active in batch:
                self._finish(active, "error", exc)
        for active in singles:
            try:
                active.reply, active.wants = active.wants.session.decode(runner, active.wants.token), None
            except Exception as exc:  # noqa: BLE001
                log.exception("decode failed for %s", active.handle.request.request_id)
                self._finish(active, "error", exc)

    def _finish(self, active: _Active, kind: str, payload: Any) -> None:
        self._active.remove(active)
        self.kv_reserved -= active.kv_bytes
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
        if active.wants is not None:
            return
        try:
            while True:  # run to the next unit of work: a prefill chunk or a decode request
                event = active.steps.send(active.reply)
                active.reply = None
                if isinstance(event, TokenEvent):
                    handle.push("token", event)
                    self._emit("token", handle, event)
                    if event.finish_reason is not None:
                        self._finish(active, "done", active.state.kv_stats())
                        return
                    continue
                if isinstance(event, NeedDecode):
                    active.wants = event
                return
        except StopIteration:
            self._finish(active, "done", active.state.kv_stats())
        except Exception as exc:  # a failing request must not take the server down
            log.exception("request %s failed", handle.request.request_id)
            self._finish(active, "error", exc)
