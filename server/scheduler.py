"""The worker thread that runs model forwards, and admission control.

HTTP handlers `submit` a prepared request and read its events from an asyncio queue. The worker
admits requests up to `max_active_sessions`, then interleaves the active ones step by step (one
prefill chunk or one decode token each, round-robin), so a short request finishes while a long
prefill is running. A cancelled request (client gone, deadline passed, server draining) stops at
the next layer boundary of its forward and its session's KV cache is released.

One request's fault stays its own: a failing step fails only that request; a failing batched
decode fails the row that raised, undoes the step for the others and runs them alone. If the
worker itself stops, new work is refused with 503 and `/health` says so.

A request's two views (the HTTP side's `Handle`, the worker's `ActiveRequest`) are in
`request_handle.py`; the decode forwards, batched where policies allow, in `decode_steps.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from kvmux.errors import DeadlineError, KvmuxError, OverloadedError, UnavailableError
from kvmux.policies.base import StepInterrupted
from kvmux.server.decode_steps import run_decodes
from kvmux.server.engine import Engine, GenerationRequest, NeedDecode, TokenEvent
from kvmux.server.limits import prepared_request_bytes, resolve_budget
from kvmux.server.request_handle import ActiveRequest, Handle

log = logging.getLogger("kvmux.scheduler")

MAX_LOOP_FAILURES = 5  # consecutive unexpected failures of the worker loop before it gives up
SHUTDOWN_STOP = "The server is shutting down; the request was stopped."


class Scheduler:
    """Owns the worker thread; every model forward happens there."""

    def __init__(
        self,
        engine: Engine,
        max_active_sessions: int = 4,
        max_queued_requests: int = 64,
        on_event: Any = None,
        kv_memory_budget_bytes: int | str | None = None,
        batch_decode: bool = True,
    ):
        self.engine = engine
        self.max_active = max_active_sessions
        self.max_queued = max_queued_requests
        self.on_event = on_event  # metrics hook: on_event(kind, handle, payload)
        self.kv_budget = resolve_budget(kv_memory_budget_bytes, engine)  # `auto`: the engine's measured budget
        self.kv_reserved = 0
        self.prefix_cache = getattr(engine, "prefix_cache", None)  # its entries count under the budget
        if self.prefix_cache is not None and self.kv_budget is not None:
            self.prefix_cache.room = lambda: self.kv_budget - self.kv_reserved
        self.batch_decode = batch_decode
        self._waiting: deque[Handle] = deque()
        self._active: list[ActiveRequest] = []
        self._lock = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._drain_deadline: float | None = None
        self.failure: str | None = None  # why the worker stopped, if it did
        self._thread = threading.Thread(target=self._loop, name="kvmux-worker", daemon=True)

    # -- public API (called from the event loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, deadline_s: float | None = None) -> Handle:
        needed = self.kv_bytes_needed(request)
        if self.kv_budget is not None and needed > self.kv_budget:
            kv, step = prepared_request_bytes(self.engine, request)
            raise UnavailableError(
                f"The request needs about {needed} bytes ({kv} of KV cache, {step} for its largest step) with "
                f"preset '{request.preset.name}', more than this server's KV memory budget of {self.kv_budget} "
                "bytes; shorten it or pick a policy that keeps less.",
                status=503,
            )
        handle = Handle(request=request, loop=asyncio.get_running_loop())
        if deadline_s:
            handle.deadline = handle.submitted_at + deadline_s
        with self._lock:
            if self.failure is not None or (self._thread.ident is not None and not self._thread.is_alive()):
                raise UnavailableError("The engine's worker has stopped; this server cannot serve requests.")
            if not self._accepting:
                raise UnavailableError("The server is shutting down and accepts no new requests.")
            # requests a free session slot will take at once do not count as waiting
            free_slots = max(self.max_active - len(self._active), 0)
            if len(self._waiting) - free_slots >= self.max_queued:
                raise OverloadedError(
                    f"Too many requests are waiting ({len(self._waiting)}); retry shortly.", status=429
                )
            self._waiting.append(handle)
            self._lock.notify()
        self._emit("queued", handle, None)
        return handle

    def kv_bytes_needed(self, request: GenerationRequest) -> int:
        """Bytes reserved for a request under the budget: its KV and its largest step's transient memory."""
        if self.kv_budget is None:  # no budget: only the KV is tracked
            preset = request.preset
            tokens = len(request.prompt_ids) + request.sampling.max_tokens
            return preset.policy.kv_bytes_needed(preset.params, self.engine.info, tokens)
        return sum(prepared_request_bytes(self.engine, request))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._accepting and self.failure is None

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def drain(self, grace_s: float) -> None:
        """Stop admitting; work still running after `grace_s` is stopped with a 503 (SIGTERM)."""
        with self._lock:
            self._accepting = False
            end = time.monotonic() + max(grace_s, 0.0)
            if self._drain_deadline is None or end < self._drain_deadline:
                self._drain_deadline = end
            self._lock.notify()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting, let in-flight work finish until the drain deadline (at most `grace_s`
        from now), stop the rest, and wait for the worker (it stops within one layer's work)."""
        self.drain(grace_s)
        while (self._active or self._waiting) and time.monotonic() < (self._drain_deadline or 0):
            time.sleep(0.02)
        with self._lock:
            self._stop_everything(UnavailableError(SHUTDOWN_STOP))
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=2.0)

    # -- worker thread ---------------------------------------------------------------------------
    def _emit(self, kind: str, handle: Handle, payload: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, handle, payload)
            except Exception:  # metrics must never break serving
                log.exception("metrics hook failed")

    def _stop_everything(self, reason: KvmuxError) -> None:
        for handle in list(self._waiting) + [a.handle for a in self._active]:
            handle.cancel(reason)

    def _end_waiting(self, handle: Handle, kind: str, payload: Any) -> None:
        handle.push(kind, payload)
        self._emit(kind, handle, payload)

    def _admit(self) -> None:
        with self._lock:
            while not self._active and not self._waiting and not self._stopped:
                self._lock.wait(timeout=0.5)
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._stop_everything(UnavailableError(SHUTDOWN_STOP))
            while self._waiting and len(self._active) < self.max_active:
                handle = self._waiting[0]
                try:
                    needed = self.kv_bytes_needed(handle.request)
                except Exception as exc:  # noqa: BLE001 - a policy's estimate failing fails only its request
                    log.exception("request %s: KV estimate failed", handle.request.request_id)
                    self._waiting.popleft()
                    self._end_waiting(handle, "error", exc)
                    continue
                if self.kv_budget is not None and self.prefix_cache is not None:
                    over = self.kv_reserved + needed + self.prefix_cache.bytes_held - self.kv_budget
                    if over > 0:  # cached prefixes give way to requests
                        self.prefix_cache.evict(over)
                if self.kv_budget is not None and self._active and self.kv_reserved + needed > self.kv_budget:
                    break  # waits (in order) until running requests release their KV
                self._waiting.popleft()
                if handle.cancelled.is_set():
                    if handle.stop_reason is not None:
                        self._end_waiting(handle, "error", handle.stop_reason)
                    else:
                        self._end_waiting(handle, "cancelled", None)
                    continue
                if handle.deadline is not None and time.monotonic() > handle.deadline:
                    self._end_waiting(handle, "error", DeadlineError("The request exceeded its deadline while queued."))
                    continue
                state = self.engine.start(handle.request)
                state.interrupt = handle.should_stop
                handle.state = state
                self.kv_reserved += needed
                self._active.append(ActiveRequest(handle, state, state.steps(), kv_bytes=needed))
                self._emit("started", handle, None)

    def _loop(self) -> None:
        failures = 0
        try:
            while not self._stopped:
                try:
                    self._admit()
                    for active in list(self._active):
                        self._step(active)
                    run_decodes(self.engine.runner, self._active, self.batch_decode, self._finish)
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("worker loop failed (%d in a row)", failures)
                    if failures >= MAX_LOOP_FAILURES:
                        raise
                    time.sleep(0.05 * failures)
        except BaseException as exc:  # noqa: BLE001 - the worker is gone: refuse work rather than hang
            self._die(exc)
            return
        self._end_all(UnavailableError(SHUTDOWN_STOP))

    def _end_all(self, reason: KvmuxError) -> None:
        """Answer every request still held (worker stopping): none may wait forever."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            self._end_waiting(handle, "error", reason)
        for active in list(self._active):
            self._finish(active, "error", reason)

    def _die(self, exc: BaseException) -> None:
        log.critical("the worker stopped: %s: %s", type(exc).__name__, exc)
        reason = UnavailableError("The engine's worker has stopped; this server cannot serve requests.")
        with self._lock:
            self.failure = f"{type(exc).__name__}: {exc}"
            self._accepting = False
        self._end_all(reason)

    def _finish(self, active: ActiveRequest, kind: str, payload: Any) -> None:
        """End one request however it ends; nothing here may take the worker down."""
        if active not in self._active:
            return
        self._active.remove(active)
        self.kv_reserved -= active.kv_bytes
        try:
            active.steps.close()  # releases the session's cache if it is still open
        except Exception:  # noqa: BLE001 - a policy failing to close is logged; its cache is dropped anyway
            log.exception("request %s: closing its session failed", active.handle.request.request_id)
        active.handle.push(kind, payload)
        self._emit(kind, active.handle, payload)

    def _kv_stats(self, active: ActiveRequest) -> dict[str, Any]:
        try:
            return active.state.kv_stats()
        except Exception:  # noqa: BLE001 - the answer is complete; only its figures are missing
            log.exception("request %s: KV stats failed", active.handle.request.request_id)
            preset = active.state.request.preset
            return {"policy": preset.policy.name, "preset": preset.name}

    def _step(self, active: ActiveRequest) -> None:
        handle = active.handle
        if active not in self._active:
            return
        if handle.should_stop():
            self._finish(active, *handle.stopped_outcome())
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
                        self._finish(active, "done", self._kv_stats(active))
                        return
                    continue
                if isinstance(event, NeedDecode):
                    active.wants = event
                return
        except StopIteration:
            self._finish(active, "done", self._kv_stats(active))
        except StepInterrupted:
            self._finish(active, *handle.stopped_outcome())
        except Exception as exc:  # a failing request must not take the server down
            log.exception("request %s failed", handle.request.request_id)
            self._finish(active, "error", exc)
