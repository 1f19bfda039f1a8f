"""Prometheus metrics: scheduler events in, exposition text out (fake handles, the real scheduler, HTTP)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from kvmux.server.engine import TokenEvent
from kvmux.server.metrics import Metrics, install_metrics_route
from kvmux.server.scheduler import Scheduler

MODEL = "test-model"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    """What metrics read from a scheduler handle (weakly referenceable, like the real one)."""

    def __init__(self, request, submitted_at: float):
        self.request, self.submitted_at, self.state = request, submitted_at, None


def fake_request(policy: str, prompt_len: int, max_tokens: int = 3) -> SimpleNamespace:
    kind = SimpleNamespace(name=policy, batched_decode=False, kv_bytes_needed=lambda params, info, tokens: 0)
    preset = SimpleNamespace(name=f"{policy}_preset", policy=kind, params=None)
    sampling = SimpleNamespace(max_tokens=max_tokens)
    return SimpleNamespace(preset=preset, prompt_ids=list(range(prompt_len)), sampling=sampling)


def fake_handle(policy: str, prompt_len: int, submitted_at: float) -> FakeHandle:
    return FakeHandle(fake_request(policy, prompt_len), submitted_at)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} parsed back from the exposition text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, policy: str | None = None, **labels: str) -> float | None:
    wanted = {"model": MODEL, **({"policy": policy} if policy else {}), **labels}
    return samples(metrics).get((name, frozenset(wanted.items())))


def run_request(metrics: Metrics, clock: Clock, handle, token_times, finish="stop", stats=None) -> None:
    metrics.on_event("queued", handle, None)
    clock.now += 0.5
    metrics.on_event("started", handle, None)
    for i, t in enumerate(token_times):
        clock.now = t
        last = i == len(token_times) - 1
        metrics.on_event("token", handle, TokenEvent(text="x", token_id=1, finish_reason=finish if last else None))
    metrics.on_event("done", handle, stats if stats is not None else {"kv_bytes_kept": 10, "kv_bytes_full": 10})


def test_one_request_fills_latency_token_outcome_and_kv_series():
    clock = Clock()
    metrics = Metrics(MODEL, clock=clock)
    handle = fake_handle("streaming_llm", prompt_len=7, submitted_at=100.0)
    stats = {"kv_bytes_kept": 1000, "kv_bytes_full": 4000, "attention_density": 0.25, "policy": "streaming_llm"}
    run_request(metrics, clock, handle, [101.0, 101.25, 101.75], finish="stop", stats=stats)
    p = "streaming_llm"
    assert value(metrics, "kvmux_time_to_first_token_seconds_count", p) == 1
    assert value(metrics, "kvmux_time_to_first_token_seconds_sum", p) == pytest.approx(1.0)
    assert value(metrics, "kvmux_inter_token_latency_seconds_count", p) == 2
    assert value(metrics, "kvmux_inter_token_latency_seconds_sum", p) == pytest.approx(0.75)
    assert value(metrics, "kvmux_e2e_request_latency_seconds_sum", p) == pytest.approx(1.75)
    assert value(metrics, "kvmux_request_queue_time_seconds_sum", p) == pytest.approx(0.5)
    assert value(metrics, "kvmux_prompt_tokens_total", p) == 7
    assert value(metrics, "kvmux_generation_tokens_total", p) == 3
    assert value(metrics, "kvmux_request_outcomes_total", p, reason="finished_stop") == 1
    assert value(metrics, "kvmux_request_kv_ratio_sum", p) == pytest.approx(0.25)
    assert value(metrics, "kvmux_request_kv_ratio_bucket", p, le="0.2") == 0
    assert value(metrics, "kvmux_request_kv_ratio_bucket", p, le="0.3") == 1
    assert value(metrics, "kvmux_kv_bytes_kept_last", p) == 1000
    assert value(metrics, "kvmux_kv_bytes_full_last", p) == 4000
    assert value(metrics, "kvmux_kv_bytes_kept_total", p) == 1000
    assert value(metrics, "kvmux_kv_bytes_full_total", p) == 4000
    assert value(metrics, "kvmux_attention_density_last", p) == 0.25
    assert value(metrics, "kvmux_requests_running", p) == 0
    assert value(metrics, "kvmux_requests_waiting", p) == 0


def test_policies_are_separate_series_and_kv_sums_accumulate():
    clock = Clock()
    metrics = Metrics(MODEL, clock=clock)
    for policy, kept in (("full", 400), ("full", 600), ("hip", 50)):
        handle = fake_handle(policy, prompt_len=3, submitted_at=clock.now)
        stats = {"kv_bytes_kept": kept, "kv_bytes_full": 1000, "attention_density": 0.1} if policy == "hip" else None
        run_request(
            metrics,
            clock,
            handle,
            [clock.now + 1.0],
            finish="length",
            stats=stats or {"kv_bytes_kept": kept, "kv_bytes_full": 1000},
        )
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="finished_length") == 2
    assert value(metrics, "kvmux_request_outcomes_total", "hip", reason="finished_length") == 1
    assert value(metrics, "kvmux_kv_bytes_kept_total", "full") == 1000
    assert value(metrics, "kvmux_kv_bytes_full_total", "full") == 2000
    assert value(metrics, "kvmux_kv_bytes_kept_last", "full") == 600
    assert value(metrics, "kvmux_attention_density_sum", "hip") == pytest.approx(0.1)
    assert value(metrics, "kvmux_attention_density_count", "full") is None  # full reports no density
    assert value(metrics, "kvmux_prompt_tokens_total", "full") == 6


def test_running_and_waiting_gauges_follow_the_lifecycle():
    clock = Clock()
    metrics = Metrics(MODEL, clock=clock)
    a, b = fake_handle("full", 2, clock.now), fake_handle("full", 2, clock.now)
    metrics.on_event("queued", a, None)
    metrics.on_event("queued", b, None)
    assert value(metrics, "kvmux_requests_waiting", "full") == 2
    metrics.on_event("started", a, None)
    assert value(metrics, "kvmux_requests_waiting", "full") == 1
    assert value(metrics, "kvmux_requests_running", "full") == 1
    metrics.on_event("cancelled", a, None)
    metrics.on_event("started", b, None)
    metrics.on_event("error", b, RuntimeError("boom"))
    assert value(metrics, "kvmux_requests_running", "full") == 0
    assert value(metrics, "kvmux_requests_waiting", "full") == 0
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="cancelled") == 1
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="error") == 1
    assert value(metrics, "kvmux_e2e_request_latency_seconds_count", "full") is None  # only finished requests


def test_events_racing_ahead_of_queued_do_not_leave_a_waiting_request():
    clock = Clock()
    metrics = Metrics(MODEL, clock=clock)
    handle = fake_handle("full", 2, clock.now)
    metrics.on_event("started", handle, None)  # the worker admitted it before `queued` was delivered
    assert value(metrics, "kvmux_requests_running", "full") == 1
    metrics.on_event("token", handle, TokenEvent(text="", token_id=2, finish_reason="stop"))
    metrics.on_event("done", handle, {"kv_bytes_kept": 1, "kv_bytes_full": 1})
    metrics.on_event("queued", handle, None)
    assert value(metrics, "kvmux_requests_waiting", "full") == 0
    assert value(metrics, "kvmux_requests_running", "full") == 0
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="finished_stop") == 1


def test_rejections_queue_sizes_and_separate_registries():
    metrics, other = Metrics(MODEL), Metrics(MODEL)
    metrics.record_rejected("queue_full", policy="full")
    metrics.record_rejected("shutting_down")
    metrics.set_queue_sizes(3, 5)
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="rejected") == 1
    assert value(metrics, "kvmux_request_outcomes_total", "none", reason="rejected") == 1
    assert value(metrics, "kvmux_requests_rejected_total", "none", cause="shutting_down") == 1
    assert value(metrics, "kvmux_scheduler_running") == 3
    assert value(metrics, "kvmux_scheduler_waiting") == 5
    assert value(other, "kvmux_request_outcomes_total", "full", reason="rejected") is None


def test_a_failing_handle_does_not_raise_for_unknown_shapes():
    metrics = Metrics(MODEL)
    odd = SimpleNamespace(request=SimpleNamespace(prompt_ids=[1]), submitted_at=0.0, state=None)
    metrics.on_event("queued", odd, None)
    metrics.on_event("done", odd, None)  # no stats, no preset: counted under policy "none"
    assert value(metrics, "kvmux_request_outcomes_total", "none", reason="finished_length") == 1


class FakeState:
    """A request state that yields one prefill step and `n` tokens, like the engine's."""

    def __init__(self, n: int):
        self.n = n
        self.finish_reason = None

    def steps(self):
        yield None
        for i in range(self.n):
            reason = "length" if i == self.n - 1 else None
            if reason:
                self.finish_reason = reason
            yield TokenEvent(text="t", token_id=i, finish_reason=reason)

    def kv_stats(self):
        return {"kv_bytes_kept": 64, "kv_bytes_full": 256}


class FakeEngine:
    info = runner = None  # never used: the fake requests ask for no decode forwards

    def start(self, request):
        return FakeState(request.sampling.max_tokens)


def test_real_scheduler_events_produce_consistent_counts():
    metrics = Metrics(MODEL)
    scheduler = Scheduler(FakeEngine(), max_active_sessions=2, max_queued_requests=16, on_event=metrics.on_event)

    async def drive():
        scheduler.start()
        handles = []
        for i in range(5):
            request = fake_request("streaming_llm" if i % 2 else "full", 4, max_tokens=3)
            handles.append(scheduler.submit(request))
        for h in handles:
            while (await asyncio.wait_for(h.events.get(), timeout=30))[0] != "done":
                pass

    asyncio.run(drive())
    scheduler.shutdown(1.0)
    assert value(metrics, "kvmux_generation_tokens_total", "full") == 9
    assert value(metrics, "kvmux_generation_tokens_total", "streaming_llm") == 6
    assert value(metrics, "kvmux_request_outcomes_total", "full", reason="finished_length") == 3
    assert value(metrics, "kvmux_inter_token_latency_seconds_count", "full") == 6
    assert value(metrics, "kvmux_request_kv_ratio_sum", "streaming_llm") == pytest.approx(0.5)
    for policy in ("full", "streaming_llm"):
        assert value(metrics, "kvmux_requests_running", policy) == 0
        assert value(metrics, "kvmux_requests_waiting", policy) == 0


def test_metrics_route_serves_exposition_and_reads_queue_sizes():
    app = FastAPI()
    metrics = Metrics(MODEL)
    metrics.record_rejected("queue_full", policy="full")
    install_metrics_route(app, metrics, queue_sizes=lambda: (2, 7))

    async def get():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/metrics")

    response = asyncio.run(get())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'kvmux_scheduler_waiting{model="test-model"} 7.0' in response.text
    assert 'kvmux_request_outcomes_total{model="test-model",policy="full",reason="rejected"} 1.0' in response.text
    assert "/metrics" not in app.openapi()["paths"]


@pytest.mark.model
def test_live_server_metrics_match_responses(smollm):
    """Real handles and KV stats from the embedded model, scraped over HTTP."""
    from kvmux.policies.presets import load_presets
    from kvmux.server.app import build_app
    from kvmux.server.config import ServerConfig
    from kvmux.server.engine import Engine
    from kvmux.server.state import ServerState
    from tests.server.conftest import PRESETS, LiveServer, free_port

    engine = Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=64, max_new_tokens=8)
    metrics = Metrics(engine.info.served_name)
    config = ServerConfig()
    scheduler = Scheduler(engine, config.max_active_sessions, config.max_queued_requests, on_event=metrics.on_event)
    app = build_app(ServerState(config=config, engine=engine, scheduler=scheduler))
    install_metrics_route(app, metrics, lambda: (scheduler.num_running, scheduler.num_waiting))
    prompt = "One two three four five six seven eight nine ten " * 12
    with LiveServer(app, free_port()) as server:
        whole = httpx.post(
            server.url + "/v1/completions",
            json={
                "prompt": prompt,
                "max_tokens": 5,
                "ignore_eos": True,
                "kv_policy": {"preset": "streaming_llm", "window": 32, "sink_tokens": 4},
            },
            timeout=120,
        ).json()
        with httpx.stream(
            "POST",
            server.url + "/v1/completions",
            json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True},
            timeout=120,
        ) as response:
            assert sum(1 for line in response.iter_lines() if line.startswith("data: {")) == 3
        scraped = httpx.get(server.url + "/metrics", timeout=30)
    assert scraped.status_code == 200
    found = {}
    for family in text_string_to_metric_families(scraped.text):
        for s in family.samples:
            found[(s.name, s.labels.get("policy"), s.labels.get("reason"))] = s.value
    model = engine.info.served_name
    assert f'model="{model}"' in scraped.text
    usage, kv = whole["usage"], whole["kv"]
    assert found[("kvmux_prompt_tokens_total", "streaming_llm", None)] == usage["prompt_tokens"]
    assert found[("kvmux_generation_tokens_total", "streaming_llm", None)] == 5
    assert found[("kvmux_generation_tokens_total", "full", None)] == 3
    assert found[("kvmux_request_outcomes_total", "full", "finished_length")] == 1
    assert found[("kvmux_time_to_first_token_seconds_count", "full", None)] == 1
    assert found[("kvmux_inter_token_latency_seconds_count", "full", None)] == 2
    assert found[("kvmux_kv_bytes_kept_last", "streaming_llm", None)] == kv["kv_bytes_kept"]
    assert found[("kvmux_kv_bytes_full_last", "streaming_llm", None)] == kv["kv_bytes_full"]
    assert kv["kv_bytes_kept"] < kv["kv_bytes_full"]  # the window evicted: the ratio is below 1
    assert found[("kvmux_request_kv_ratio_sum", "streaming_llm", None)] == pytest.approx(kv["kv_ratio"], abs=1e-3)
    assert found[("kvmux_requests_running", "full", None)] == 0
    assert found[("kvmux_scheduler_running", None, None)] == 0
