"""Hostile and faulty requests against the worker: one request's fault stays its own.

Part of the hostile-client suite (with test_hostile_http.py and test_hostile_limits.py). A
deliberately faulty policy (tests/faulty_policy.py) is registered for these tests only and mixed
into batches with healthy requests: only the faulty request fails, the healthy ones finish with
consistent caches, and the worker keeps serving. Also: a cancelled or timed-out request stops at
the next layer boundary of a long forward, draining stops running work with a 503, a dead worker
refuses new work, and SSE streams wait for events instead of polling.
"""

from __future__ import annotations

import asyncio

import pytest

from kvmux.policies.presets import Preset
from kvmux.policies.registry import _REGISTRY, register
from kvmux.server.errors import DeadlineError, UnavailableError
from kvmux.server.handlers import stream_events
from kvmux.server.sampling import SamplingParams
from kvmux.server.scheduler import MAX_LOOP_FAILURES, Handle, Scheduler
from tests.faulty_policy import FaultyPolicy, InjectedFault
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
