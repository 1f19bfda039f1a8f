"""Hostile and faulty requests against the worker: one request's fault stays its own.

Part of the hostile-client suite (with the other test_hostile_*.py files). A
deliberately faulty policy (tests/faulty_policy.py) is registered for these tests only and mixed
into batches with healthy requests: only the faulty request fails, the healthy ones finish with
consistent caches, and the worker keeps serving. Also: a cancelled or timed-out request stops at
the next layer boundary of a long forward, draining stops running work with a 503, a dead worker
refuses new work, and SSE streams wait for events instead of polling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmux.errors import DeadlineError, UnavailableError
from kvmux.policies.presets import Preset, load_presets
from kvmux.policies.registry import _REGISTRY, register
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.handlers import stream_events
from kvmux.server.request_handle import Handle
from kvmux.server.sampling import SamplingParams
from kvmux.server.scheduler import MAX_LOOP_FAILURES, Scheduler
from kvmux.server.serve import create_app, draining_server
from tests.faulty_policy import FaultyPolicy, InjectedFault
from tests.server.conftest import PRESETS, free_port, start_server
from tests.tiny_models import tiny_engine

LAYERS = 6
FAULTS = ("prefill", "decode", "after_decode", "stats", "close")


def add_faulty_presets(engine) -> None:
    policy = FaultyPolicy()
    for where in FAULTS:
        params = FaultyPolicy.Params(fail_in=where, fail_after=2, fail_layer=LAYERS // 2)
        engine.presets[f"faulty_{where}"] = Preset(f"faulty_{where}", policy, params)


@pytest.fixture(scope="module")
def engine():
    register(FaultyPolicy)
    engine = tiny_engine(prefill_chunk_tokens=64, model_overrides={"num_hidden_layers": LAYERS})
    add_faulty_presets(engine)
    yield engine
    _REGISTRY.pop(FaultyPolicy.name, None)


def _request(engine, preset: str, max_tokens: int = 8, prompt_len: int = 40):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.prepare(prompt="b" * prompt_len, sampling=sampling, kv_policy=preset)


async def _outcome(handle, timeout: float = 120) -> tuple[str, object, int]:
    """(last event kind, its payload, tokens received)."""
    tokens = 0
    while True:
        kind, payload = await asyncio.wait_for(handle.events.get(), timeout=timeout)
        if kind == "token":
            tokens += 1
        else:
            return kind, payload, tokens


def _batch_sizes(engine, monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = engine.runner.decode_batch

    def spy(sessions, tokens):
        sizes.append(len(sessions))
        return original(sessions, tokens)

    monkeypatch.setattr(engine.runner, "decode_batch", spy)
    return sizes


def _run_mixed(engine, faulty: str, healthy: int = 3, max_tokens: int = 8):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=healthy + 1)
        scheduler.start()
        try:
            handles = [scheduler.submit(_request(engine, "full", max_tokens, 40 + 7 * i)) for i in range(healthy)]
            bad = scheduler.submit(_request(engine, faulty, max_tokens))
            outcomes = await asyncio.gather(*(_outcome(h) for h in [*handles, bad]))
            follow_up = await _outcome(scheduler.submit(_request(engine, "full", 3)))
            return outcomes, follow_up, scheduler.alive, scheduler.kv_reserved, scheduler.num_running
        finally:
            scheduler.shutdown(grace_s=0)

    return asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["decode", "after_decode"])
def test_batched_decode_fault_fails_only_the_culprit(engine, monkeypatch, fault):
    sizes = _batch_sizes(engine, monkeypatch)
    outcomes, follow_up, alive, reserved, running = _run_mixed(engine, f"faulty_{fault}")
    *healthy, bad = outcomes
    assert max(sizes) == 4  # the faulty request really shared a batch with the healthy ones
    assert bad[0] == "error" and isinstance(bad[1], InjectedFault)
    for kind, stats, tokens in healthy:
        assert kind == "done" and tokens == 8
        # the undone step left no duplicate K/V behind: the cache holds exactly the tokens seen
        assert stats["tokens_kept"] == stats["tokens_seen"]
    assert follow_up[0] == "done" and alive and reserved == 0 and running == 0


def test_faulty_prefill_fails_alone(engine):
    outcomes, follow_up, alive, _, _ = _run_mixed(engine, "faulty_prefill")
    *healthy, bad = outcomes
    assert bad[0] == "error" and isinstance(bad[1], InjectedFault)
    assert all(kind == "done" and tokens == 8 for kind, _, tokens in healthy)
    assert follow_up[0] == "done" and alive


@pytest.mark.parametrize("fault", ["stats", "close"])
def test_faulty_stats_or_close_still_answers(engine, fault):
    outcomes, follow_up, alive, reserved, _ = _run_mixed(engine, f"faulty_{fault}")
    *healthy, bad = outcomes
    # the answer is complete; only the policy's figures (or its clean-up) failed, which is logged
    assert bad[0] == "done" and bad[2] == 8 and bad[1]["policy"] == "faulty"
    assert all(kind == "done" for kind, _, _ in healthy)
    assert follow_up[0] == "done" and alive and reserved == 0


def _stop_after_checks(monkeypatch, checks: int, how: str) -> list[int]:
    """Make a request stop once `checks` interrupt checks have passed; returns the call count."""
    calls = [0]
    original = Handle.should_stop

    def counting(self):
        calls[0] += 1
        if calls[0] == checks:
            if how == "cancel":
                self.cancel()
            else:
                self.deadline = 0.0
        return original(self)

    monkeypatch.setattr(Handle, "should_stop", counting)
    return calls


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_long_forward_stops_at_the_next_layer(engine, monkeypatch, how):
    """One prefill forward of 6 layers: a stop during it takes effect before the next layer."""
    # one check before the step, then one per layer: the 3rd check is the one before layer 1
    calls = _stop_after_checks(monkeypatch, checks=3, how=how)

    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=1)
        scheduler.start()
        try:
            handle = scheduler.submit(_request(engine, "full", max_tokens=4, prompt_len=60))
            return await _outcome(handle), scheduler
        finally:
            scheduler.shutdown(grace_s=0)

    (kind, payload, tokens), scheduler = asyncio.run(scenario())
    assert tokens == 0 and calls[0] == 3  # stopped inside the first forward, before its layer 1
    if how == "cancel":
        assert kind == "cancelled"
    else:
        assert kind == "error" and isinstance(payload, DeadlineError) and payload.status == 408
    assert scheduler.kv_reserved == 0 and scheduler.num_running == 0


def test_drain_stops_running_work_with_503(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=2)
        scheduler.start()
        try:
            handle = scheduler.submit(_request(engine, "full", max_tokens=4000))
            kind, _ = await asyncio.wait_for(handle.events.get(), timeout=60)
            assert kind == "token"
            scheduler.drain(0.2)
            with pytest.raises(UnavailableError):
                scheduler.submit(_request(engine, "full", 2))
            return await _outcome(handle), scheduler.alive
        finally:
            scheduler.shutdown(grace_s=0)

    (kind, payload, tokens), alive = asyncio.run(scenario())
    assert kind == "error" and isinstance(payload, UnavailableError) and payload.status == 503
    assert "shutting down" in payload.message and tokens > 0 and not alive


def test_dead_worker_refuses_new_work(engine, monkeypatch):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=2)

        def broken(active):
            raise RuntimeError("worker bug")

        monkeypatch.setattr(scheduler, "_step", broken)
        scheduler.start()
        handle = scheduler.submit(_request(engine, "full", 2))
        outcome = await _outcome(handle)
        scheduler._thread.join(timeout=30)
        with pytest.raises(UnavailableError) as refused:
            scheduler.submit(_request(engine, "full", 2))
        return outcome, scheduler, refused.value

    (kind, payload, _), scheduler, refused = asyncio.run(scenario())
    assert kind == "error" and isinstance(payload, UnavailableError) and payload.status == 503
    assert not scheduler.alive and "RuntimeError: worker bug" in scheduler.failure
    assert refused.status == 503 and "worker has stopped" in refused.message
    assert MAX_LOOP_FAILURES > 1


class CountingQueue(asyncio.Queue):
    polls = 0

    def empty(self) -> bool:
        CountingQueue.polls += 1
        return super().empty()


def test_stream_waits_for_events_without_polling(engine):
    """A stream whose request is silent for 1.5 s checks its queue a handful of times, not ~300."""

    class Quiet:
        async def is_disconnected(self) -> bool:
            return False

    async def scenario():
        loop = asyncio.get_running_loop()
        request = _request(engine, "full", 2)
        handle = Handle(request=request, loop=loop, events=CountingQueue())
        loop.call_later(1.5, handle.push, "done", {})
        chunks = [c async for c in stream_events(None, [handle], Quiet(), None, None, include_usage=False)]
        return chunks

    CountingQueue.polls = 0
    assert asyncio.run(scenario()) == ["data: [DONE]\n\n"]
    assert CountingQueue.polls < 40


# -- through a live server on the embedded model ---------------------------------------------------
@pytest.fixture(scope="module")
def faulty_server(smollm):
    register(FaultyPolicy)
    server = start_server(smollm, max_active_sessions=6)
    add_faulty_presets(server.engine)
    with server:
        yield server
    _REGISTRY.pop(FaultyPolicy.name, None)


def _completion(url: str, preset: str, max_tokens: int, stream: bool = False, timeout: float = 300) -> httpx.Response:
    body = {
        "prompt": "The river ran past the old mill and",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "kv_policy": preset,
    }
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _wait_idle(url: str) -> None:
    for _ in range(600):
        if _metric(url, "kvmux_scheduler_running") == 0 and _metric(url, "kvmux_scheduler_waiting") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not become idle")


@pytest.mark.model
def test_live_faulty_request_among_healthy_ones(faulty_server, monkeypatch):
    sizes = _batch_sizes(faulty_server.engine, monkeypatch)
    url = faulty_server.url
    with ThreadPoolExecutor(4) as pool:
        healthy = [pool.submit(_completion, url, "full", 12, stream=i == 0) for i in range(3)]
        bad = pool.submit(_completion, url, "faulty_decode", 12)
        bad, healthy = bad.result(), [f.result() for f in healthy]
    assert max(sizes) >= 2
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "InternalServerError" and error["code"] == 500
    assert "injected" not in error["message"] and "Fault" not in error["message"]  # details stay in the log
    for response in healthy:
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("text/event-stream"):
            assert '"error"' not in response.text and response.text.rstrip().endswith("data: [DONE]")
        else:
            assert response.json()["usage"]["completion_tokens"] == 12
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert _completion(url, "full", 2).status_code == 200


@pytest.mark.model
def test_live_n_choices_all_cancelled_when_the_client_leaves(faulty_server):
    url = faulty_server.url
    _wait_idle(url)
    before = _metric(url, "kvmux_request_outcomes_total", reason="cancelled")
    ended = _metric(url, "kvmux_request_outcomes_total")
    body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "n": 3, "temperature": 0.8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=2.0))
    for _ in range(1200):  # until the three choices have ended, however they ended
        if _metric(url, "kvmux_request_outcomes_total") - ended >= 3:
            break
        time.sleep(0.1)
    # every choice was stopped, none ran on to its 400 tokens unobserved
    assert _metric(url, "kvmux_request_outcomes_total", reason="cancelled") - before == 3
    assert _completion(url, "full", 2).status_code == 200


@pytest.mark.model
def test_sigterm_shutdown_fits_the_grace_period(smollm, tmp_path):
    """A stream in flight at SIGTERM is stopped with a 503 event and the process exits 0 in time."""
    grace = 4.0
    config = tmp_path / "server.yaml"
    config.write_text(f"shutdown_grace_s: {grace}\nmax_new_tokens: 100000\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "kvmux.cli", "serve", "--config", str(config), "--port", str(port)]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 4:  # the stream is running: stop the server now
                    started = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert elapsed < grace + 1.5, f"shutdown took {elapsed:.1f} s with shutdown_grace_s {grace}"
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"code": 503' in events[-2] and "shutting down" in events[-2]


@pytest.mark.model
def test_connections_beyond_the_limit_get_503(smollm):
    """max_connections bounds open connections (and so the bodies they can upload at once)."""
    engine = Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=512, max_new_tokens=4000)
    config = ServerConfig(port=free_port(), max_connections=1)
    server = draining_server(create_app(config, engine=engine), config, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.1)
        body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: closing the iterator would close the connection
            assert next(lines).startswith("data: ")
            assert httpx.get(url + "/health", timeout=10).status_code == 503  # a second connection
        for _ in range(100):  # the held connection is closed: the server serves again
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                break
            time.sleep(0.1)
        assert _completion(url, "full", 2).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
