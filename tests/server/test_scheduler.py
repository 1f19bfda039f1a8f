"""The worker: interleaving, cancellation releasing KV, queue limits, KV-memory admission."""

from __future__ import annotations

import asyncio

import pytest

from kvmux.errors import OverloadedError, UnavailableError
from kvmux.server.sampling import SamplingParams
from kvmux.server.scheduler import Scheduler
from tests.tiny_models import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(prefill_chunk_tokens=16)


def _request(engine, prompt_len: int, max_tokens: int, preset: str = "full"):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.prepare(prompt="a" * prompt_len, sampling=sampling, kv_policy=preset)


async def _drain(handle) -> list[str]:
    kinds = []
    while True:
        kind, _ = await asyncio.wait_for(handle.events.get(), timeout=60)
        kinds.append(kind)
        if kind in {"done", "error", "cancelled"}:
            return kinds


def _run(coro):
    return asyncio.run(coro)


def test_short_request_finishes_while_long_prefill_runs(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=4)
        scheduler.start()
        try:
            order = []
            long = scheduler.submit(_request(engine, 1500, 2))
            short = scheduler.submit(_request(engine, 10, 2))

            async def watch(name, handle):
                await _drain(handle)
                order.append(name)

            await asyncio.gather(watch("long", long), watch("short", short))
            return order
        finally:
            scheduler.shutdown(grace_s=0)

    assert _run(scenario()) == ["short", "long"]


def test_cancel_releases_session_and_kv(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=2, kv_memory_budget_bytes=10**9)
        scheduler.start()
        try:
            handle = scheduler.submit(_request(engine, 200, 3000))
            kind, _ = await asyncio.wait_for(handle.events.get(), timeout=60)
            assert kind == "token" and scheduler.num_running == 1 and scheduler.kv_reserved > 0
            handle.cancel()
            kinds = await _drain(handle)
            assert kinds[-1] == "cancelled"
            assert scheduler.num_running == 0 and scheduler.kv_reserved == 0
            # the session's cache was released
            assert handle.state.session.stats().tokens_kept == 0
        finally:
            scheduler.shutdown(grace_s=0)

    _run(scenario())


def test_queue_limit_gives_429(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=1, max_queued_requests=1)
        # not started: nothing is admitted, so the queue fills (one for the free slot, one waiting)
        scheduler.submit(_request(engine, 5, 1))
        scheduler.submit(_request(engine, 5, 1))
        with pytest.raises(OverloadedError) as info:
            scheduler.submit(_request(engine, 5, 1))
        assert info.value.status == 429

    _run(scenario())


def test_no_queue_still_admits_into_free_slots(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=2, max_queued_requests=0)
        scheduler.start()
        try:
            first = scheduler.submit(_request(engine, 5, 30))
            second = scheduler.submit(_request(engine, 5, 30))
            with pytest.raises(OverloadedError):  # both slots taken and nothing may wait
                scheduler.submit(_request(engine, 5, 1))
            assert (await _drain(first))[-1] == "done" and (await _drain(second))[-1] == "done"
            third = scheduler.submit(_request(engine, 5, 1))
            assert (await _drain(third))[-1] == "done"
        finally:
            scheduler.shutdown(grace_s=0)

    _run(scenario())


def test_kv_budget_rejects_oversized_and_queues_the_rest(engine):
    per_token = engine.info.kv_bytes_per_token

    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=4, kv_memory_budget_bytes=per_token * 300)
        scheduler.start()
        try:
            with pytest.raises(UnavailableError) as info:
                scheduler.submit(_request(engine, 400, 10))
            assert info.value.status == 503 and "budget" in info.value.message
            # a window-bounded policy fits where full does not
            scheduler.submit(_request(engine, 400, 10, preset="streaming_llm_small"))
            first = scheduler.submit(_request(engine, 200, 40))
            second = scheduler.submit(_request(engine, 200, 5))
            await asyncio.wait_for(first.events.get(), timeout=60)
            assert second.state is None  # waits for KV, not started
            await _drain(first)
            assert (await _drain(second))[-1] == "done"
        finally:
            scheduler.shutdown(grace_s=0)

    small = engine.presets["streaming_llm"]
    engine.presets["streaming_llm_small"] = type(small)(
        "streaming_llm_small", small.policy, small.policy.Params(sink_tokens=4, window=32)
    )
    try:
        _run(scenario())
    finally:
        del engine.presets["streaming_llm_small"]


def test_batched_decode_serves_concurrent_requests(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=4)
        calls = []
        original = engine.runner.decode_batch

        def spy(sessions, tokens):
            calls.append(len(sessions))
            return original(sessions, tokens)

        engine.runner.decode_batch = spy
        scheduler.start()
        try:
            handles = [scheduler.submit(_request(engine, 20, 8, p)) for p in ("full", "streaming_llm", "full")]
            results = await asyncio.gather(*(_drain(h) for h in handles))
        finally:
            scheduler.shutdown(grace_s=0)
            del engine.runner.decode_batch
        return results, calls

    results, calls = _run(scenario())
    assert all(r.count("token") == 8 and r[-1] == "done" for r in results)
    assert calls and max(calls) == 3
