"""Prometheus metrics for the server: latency, tokens, outcomes, queue sizes, and KV-cache savings.

Built on `prometheus-client` with a registry owned by each `Metrics` instance (no process-wide
state, so several servers or tests can live in one process). The scheduler calls `on_event` from
its worker thread (and `queued` from the event loop); timings are taken there with a monotonic
clock, the same one that stamps `Handle.submitted_at`.

Every series carries `model` and `policy` labels (the policy is the algorithm, e.g.
`streaming_llm`, not the preset name; a composed preset's is the pair of its parts' policies,
e.g. `flexprefill+lazy_eviction`). Besides the serving metrics that other OpenAI-compatible
servers export (time to first token, inter-token latency, end-to-end latency, token counters,
running/waiting gauges, outcomes), kvmux reports what its KV policies save: the bytes a finished
request's cache held against what a full cache of every token it saw would have held, and the
attention density that sparse-attention policies report (HiP, arXiv 2406.09827; FlexPrefill,
arXiv 2502.20766).

As a Ray Serve replica (`kvmux serve --replicas N`), `Metrics.replica` is set and every series also
carries a `replica` label with the replica's id; a single process's output has no such label.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(16, 38, 2))  # 64 KiB .. 128 GiB
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
OUTCOMES = ("finished_stop", "finished_length", "error", "cancelled", "rejected")
UNKNOWN_POLICY = "none"


@dataclass
class _Track:
    """Per-request timing; lives from `queued` (or `started`) to the request's last event."""

    handle: Any
    policy: str
    state: str  # "waiting" or "running": which gauge counts it
    started: bool = False
    last_token_at: float | None = None
    finish_reason: str | None = None


def policy_of(handle: Any) -> str:
    try:
        return str(handle.request.preset.policy.name)
    except AttributeError:
        return UNKNOWN_POLICY


def density_of(stats: dict[str, Any]) -> float | None:
    """The attention density a sparse policy reported (`KVStats.attention_density`), if any."""
    value = stats.get("attention_density")
    return float(value) if isinstance(value, (int, float)) else None


class Metrics:
    """All serving metrics of one server, in its own registry."""

    def __init__(self, model: str, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.clock = clock
        self.replica: str | None = None  # a Serve replica's id: then every series carries a `replica` label
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._tracks: dict[int, _Track] = {}
        self._ended: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._counts: dict[tuple[str, str], int] = {}  # (state, policy) -> requests
        reg, labels = self.registry, ("model", "policy")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=reg, buckets=buckets)

        self.ttft = hist("kvmux_time_to_first_token_seconds", "Submission to first generated token.", LATENCY_BUCKETS)
        self.itl = hist("kvmux_inter_token_latency_seconds", "Time between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e = hist(
            "kvmux_e2e_request_latency_seconds", "Submission to the end of a finished request.", LATENCY_BUCKETS
        )
        self.queue_time = hist("kvmux_request_queue_time_seconds", "Submission to admission.", LATENCY_BUCKETS)
        self.prompt_tokens = Counter("kvmux_prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=reg)
        self.generation_tokens = Counter("kvmux_generation_tokens", "Generated tokens.", labels, registry=reg)
        self.outcomes = Counter(
            "kvmux_request_outcomes",
            "Requests by how they ended: finished_stop, finished_length, error, cancelled, rejected.",
            (*labels, "reason"),
            registry=reg,
        )
        self.rejections = Counter(
            "kvmux_requests_rejected", "Requests refused at admission, by cause.", (*labels, "cause"), registry=reg
        )
        self.running = Gauge("kvmux_requests_running", "Requests being run by the engine.", labels, registry=reg)
        self.waiting = Gauge("kvmux_requests_waiting", "Requests queued for admission.", labels, registry=reg)
        self.scheduler_running = Gauge(
            "kvmux_scheduler_running", "Active sessions as the scheduler counts them.", ("model",), registry=reg
        )
        self.scheduler_waiting = Gauge(
            "kvmux_scheduler_waiting", "Queued requests as the scheduler counts them.", ("model",), registry=reg
        )
        self.kv_kept = hist("kvmux_request_kv_bytes_kept", "KV bytes a finished request's cache held.", BYTES_BUCKETS)
        self.kv_full = hist(
            "kvmux_request_kv_bytes_full", "KV bytes a full cache of the same tokens would hold.", BYTES_BUCKETS
        )
        self.kv_ratio = hist("kvmux_request_kv_ratio", "KV bytes held divided by a full cache's.", FRACTION_BUCKETS)
        self.kv_kept_total = Counter(
            "kvmux_kv_bytes_kept", "Sum of KV bytes held by finished requests.", labels, registry=reg
        )
        self.kv_full_total = Counter(
            "kvmux_kv_bytes_full", "Sum of KV bytes full caches would have held.", labels, registry=reg
        )
        self.kv_kept_last = Gauge(
            "kvmux_kv_bytes_kept_last", "KV bytes held by the last finished request.", labels, registry=reg
        )
        self.kv_full_last = Gauge(
            "kvmux_kv_bytes_full_last", "Full-cache KV bytes of the last finished request.", labels, registry=reg
        )
        self.density = hist("kvmux_attention_density", "Attention density a sparse policy reported.", FRACTION_BUCKETS)
        self.density_last = Gauge(
            "kvmux_attention_density_last", "Attention density of the last finished request.", labels, registry=reg
        )

    # -- the scheduler hook ----------------------------------------------------------------------
    def on_event(self, kind: str, handle: Any, payload: Any) -> None:
        """Record one scheduler event: queued, started, token, done, error, cancelled."""
        now = self.clock()
        with self._lock:
            key = id(handle)
            track = self._tracks.get(key)
            if track is None:
                if kind == "queued" and self._ended.get(key) is handle:
                    return  # the request ended before its `queued` event was delivered
                track = _Track(handle, policy_of(handle), "waiting" if kind == "queued" else "running")
                self._tracks[key] = track
                self._move(track.policy, None, track.state)
            labels = {"model": self.model, "policy": track.policy}
            if kind == "started":
                self._on_started(track, handle, labels, now)
            elif kind == "token":
                self._on_token(track, handle, payload, labels, now)
            elif kind in ("done", "error", "cancelled"):
                self._on_end(track, kind, handle, payload, labels, now)

    def _on_started(self, track: _Track, handle: Any, labels: dict[str, str], now: float) -> None:
        if track.started:
            return
        self._move(track.policy, track.state, "running")
        track.state, track.started = "running", True
        self.queue_time.labels(**labels).observe(max(now - handle.submitted_at, 0.0))
        self.prompt_tokens.labels(**labels).inc(len(handle.request.prompt_ids))

    def _on_token(self, track: _Track, handle: Any, event: Any, labels: dict[str, str], now: float) -> None:
        if track.last_token_at is None:
            self.ttft.labels(**labels).observe(max(now - handle.submitted_at, 0.0))
        else:
            self.itl.labels(**labels).observe(max(now - track.last_token_at, 0.0))
        track.last_token_at = now
        self.generation_tokens.labels(**labels).inc()
        reason = getattr(event, "finish_reason", None)
        if reason is not None:
            track.finish_reason = reason

    def _on_end(self, track: _Track, kind: str, handle: Any, payload: Any, labels: dict[str, str], now: float) -> None:
        key = id(handle)
        del self._tracks[key]
        try:
            self._ended[key] = handle
        except TypeError:  # not weakly referenceable: a late `queued` would be counted again
            pass
        self._move(track.policy, track.state, None)
        if kind == "done":
            reason = track.finish_reason or getattr(getattr(handle, "state", None), "finish_reason", None) or "length"
            self.outcomes.labels(**labels, reason=f"finished_{reason}").inc()
            self.e2e.labels(**labels).observe(max(now - handle.submitted_at, 0.0))
            if isinstance(payload, dict):
                self._record_kv(payload, labels)
        else:
            self.outcomes.labels(**labels, reason=kind).inc()

    def _record_kv(self, stats: dict[str, Any], labels: dict[str, str]) -> None:
        kept, full = stats.get("kv_bytes_kept"), stats.get("kv_bytes_full")
        if isinstance(kept, (int, float)) and isinstance(full, (int, float)):
            self.kv_kept.labels(**labels).observe(kept)
            self.kv_full.labels(**labels).observe(full)
            self.kv_kept_total.labels(**labels).inc(kept)
            self.kv_full_total.labels(**labels).inc(full)
            self.kv_kept_last.labels(**labels).set(kept)
            self.kv_full_last.labels(**labels).set(full)
            if full > 0:
                self.kv_ratio.labels(**labels).observe(kept / full)
        density = density_of(stats)
        if density is not None:
            self.density.labels(**labels).observe(density)
            self.density_last.labels(**labels).set(density)

    def _move(self, policy: str, source: str | None, target: str | None) -> None:
        """Move one request of `policy` between the waiting/running gauges (None: outside)."""
        for gauge in (self.running, self.waiting):  # both series exist once a policy has been seen
            gauge.labels(model=self.model, policy=policy)
        for state, delta in ((source, -1), (target, 1)):
            if state is None or source == target:
                continue
            count = self._counts.get((state, policy), 0) + delta
            self._counts[(state, policy)] = count
            gauge = self.running if state == "running" else self.waiting
            gauge.labels(model=self.model, policy=policy).set(count)

    # -- calls from the HTTP side ----------------------------------------------------------------
    def set_queue_sizes(self, running: int, waiting: int) -> None:
        """The scheduler's own counts (read at scrape time)."""
        self.scheduler_running.labels(model=self.model).set(running)
        self.scheduler_waiting.labels(model=self.model).set(waiting)

    def record_rejected(self, reason: str, policy: str | None = None) -> None:
        """A request refused before it was queued (queue full, out of KV memory, shutting down...)."""
        labels = {"model": self.model, "policy": policy or UNKNOWN_POLICY}
        self.outcomes.labels(**labels, reason="rejected").inc()
        self.rejections.labels(**labels, cause=reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        if self.replica is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return generate_latest(WithLabels(self.registry, {"replica": self.replica})), CONTENT_TYPE_LATEST


class WithLabels:
    """A view of a registry in which every sample also carries the given constant labels."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield labelled


def install_metrics_route(app: Any, metrics: Metrics, queue_sizes: Callable[[], tuple[int, int]] | None = None) -> None:
    """Add `GET /metrics`; `queue_sizes()` -> (running, waiting) is read on every scrape."""
    from starlette.responses import Response

    async def metrics_endpoint() -> Response:
        if queue_sizes is not None:
            metrics.set_queue_sizes(*queue_sizes())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
