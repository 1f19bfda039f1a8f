"""The prefix cache under memory pressure: a soak of mixed documents never holds more than its
capacity, and admission control evicts cached entries when a request needs their room."""

from __future__ import annotations

import asyncio
import random

from kvmux.server.sampling import SamplingParams
from kvmux.server.scheduler import Scheduler
from tests.tiny_models import tiny_engine


def test_mixed_documents_never_exceed_the_capacity():
    probe = tiny_engine(prefill_chunk_tokens=32)
    entry_bytes = probe.info.kv_bytes_per_token * 200
    engine = tiny_engine(prefill_chunk_tokens=32, prefix_cache_bytes=3 * entry_bytes)
    cache = engine.prefix_cache
    rng = random.Random(0)
    documents = ["".join(rng.choice("abcdefgh ") for _ in range(200)) for _ in range(6)]
    hits = 0
    for i in range(30):
        prompt = rng.choice(documents) + f" question {i}?"
        result = engine.generate(prompt=prompt, sampling=SamplingParams(max_tokens=2, temperature=0))
        hits += result.kv["cached_tokens"] > 0
        assert cache.bytes_held <= cache.capacity_bytes
        assert len(cache) <= 3
    assert hits >= 5  # documents asked again while still cached
    assert sum(c.evictions for c in cache.counters.values()) > 0


def test_admission_evicts_cached_entries_for_a_request():
    probe = tiny_engine(prefill_chunk_tokens=32)
    per_token = probe.info.kv_bytes_per_token
    engine = tiny_engine(prefill_chunk_tokens=32, prefix_cache_bytes=10**9)

    async def scenario():
        scheduler = Scheduler(engine, max_active_sessions=2, kv_memory_budget_bytes=per_token * 900)
        scheduler.start()
        try:
            for doc in range(3):  # ~250-token entries fill the room the budget leaves
                prompt = chr(97 + doc) * 250
                request = engine.prepare(prompt=prompt, sampling=SamplingParams(max_tokens=1, temperature=0))
                handle = scheduler.submit(request)
                while (await asyncio.wait_for(handle.events.get(), 60))[0] not in ("done", "error"):
                    pass
            held = engine.prefix_cache.bytes_held
            assert held >= per_token * 450  # at least two entries (each offer stays within budget - reserved)
            big = engine.prepare(prompt="z" * 500, sampling=SamplingParams(max_tokens=4, temperature=0))
            handle = scheduler.submit(big)
            kinds = []
            while not kinds or kinds[-1] not in ("done", "error"):
                kinds.append((await asyncio.wait_for(handle.events.get(), 60))[0])
            assert kinds[-1] == "done"
            assert engine.prefix_cache.bytes_held < held  # entries gave way to the request
        finally:
            scheduler.shutdown(grace_s=0)

    asyncio.run(scenario())
