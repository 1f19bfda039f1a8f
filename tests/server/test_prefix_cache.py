"""The prefix cache on its own: chained block hashes, longest-prefix lookup, what each kind of state
may serve, LRU within a byte capacity, pins, subsumed entries, and the per-policy counters."""

from __future__ import annotations

import pytest

from kvmux.server.prefix_cache import PrefixCache, chained_block_hashes, resolve_prefix_cache_bytes

KEY = "model|full|{}"


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def offer(cache: PrefixCache, tokens: list[int], nbytes: int = 100, truncatable: bool = True, granularity: int = 1):
    return cache.offer(KEY, "full", tokens, {"n": len(tokens)}, nbytes, truncatable, granularity)


def test_chained_hashes_name_whole_prefixes():
    a = chained_block_hashes(KEY, ids(40), 8, 5)
    b = chained_block_hashes(KEY, ids(16) + [999] + ids(23, 17), 8, 5)
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]  # a change in block 2 changes every later hash
    assert chained_block_hashes("other", ids(40), 8, 5)[0] != a[0]


def test_truncatable_entry_serves_the_longest_common_prefix():
    cache = PrefixCache(10_000, block_tokens=8)
    assert offer(cache, ids(50))
    prompt = ids(37) + [500, 501, 502]
    hit = cache.lookup(KEY, "full", prompt, max_length=len(prompt) - 1)
    assert hit is not None and hit.length == 37  # past the last whole shared block, token by token
    cache.release(hit)
    assert cache.lookup("another|key", "full", prompt, 39) is None


def test_lookup_respects_max_length_and_granularity():
    cache = PrefixCache(10_000, block_tokens=8)
    offer(cache, ids(64), granularity=16)
    hit = cache.lookup(KEY, "full", ids(64), max_length=63)
    assert hit is not None and hit.length == 48  # the longest multiple of 16 under 63
    cache.release(hit)
    assert cache.lookup(KEY, "full", ids(64), max_length=15) is None


def test_exact_length_entry_serves_only_its_length():
    cache = PrefixCache(10_000, block_tokens=8)
    assert offer(cache, ids(32), truncatable=False, granularity=32)
    hit = cache.lookup(KEY, "full", ids(40), max_length=39)
    assert hit is not None and hit.length == 32
    cache.release(hit)
    assert cache.lookup(KEY, "full", ids(31) + [7, 7, 7], max_length=33) is None  # shares 31 tokens only
    assert cache.lookup(KEY, "full", ids(40), max_length=31) is None  # may not serve a shorter prefix


def test_tokens_are_checked_not_only_hashes():
    cache = PrefixCache(10_000, block_tokens=8)
    offer(cache, ids(32))
    entry = next(iter(cache._entries.values()))
    entry.tokens = tuple([5] * 32)  # as if another prompt had collided on every hash
    assert cache.lookup(KEY, "full", ids(40), max_length=39) is None


def test_lru_eviction_within_capacity_keeps_pinned_entries():
    cache = PrefixCache(250, block_tokens=8)
    offer(cache, ids(16, 0))
    offer(cache, ids(16, 100))
    pinned = cache.lookup(KEY, "full", ids(16, 0) + [1], max_length=16)
    assert pinned is not None
    assert offer(cache, ids(16, 200))  # evicts the least recently used unpinned entry (the second)
    assert cache.lookup(KEY, "full", ids(16, 100) + [1], 16) is None
    assert cache.counters["full"].evictions == 1
    assert not offer(cache, ids(16, 300), nbytes=300)  # larger than the capacity: refused
    assert cache.bytes_held == 200
    cache.release(pinned)
    assert cache.evict(150) == 200  # admission control frees what it needs (LRU first)
    assert len(cache) == 0 and cache.bytes_held == 0


def test_longer_turn_replaces_the_entry_it_extends():
    cache = PrefixCache(10_000, block_tokens=8)
    offer(cache, ids(24))
    offer(cache, ids(48))  # the chat's next turn: the first entry is now redundant
    assert len(cache) == 1
    assert not offer(cache, ids(40))  # already served by the 48-token entry
    hit = cache.lookup(KEY, "full", ids(30) + [0], max_length=30)
    assert hit is not None and hit.length == 30 and hit.entry.length == 48


def test_room_limits_what_entries_may_hold():
    cache = PrefixCache(10_000, block_tokens=8)
    cache.room = lambda: 150
    assert offer(cache, ids(16))
    assert offer(cache, ids(16, 50))  # evicts the first to stay within the room
    assert len(cache) == 1 and cache.bytes_held == 100


def test_counters_and_short_prompts():
    cache = PrefixCache(10_000, block_tokens=8)
    assert not offer(cache, ids(7))  # no whole block: nothing to index
    assert cache.lookup(KEY, "full", ids(20), 19) is None
    offer(cache, ids(16))
    hit = cache.lookup(KEY, "full", ids(20), 19)
    cache.release(hit)
    c = cache.counters["full"]
    assert (c.hits, c.misses, c.tokens_served, c.stored) == (1, 1, 16, 1)
    assert cache.held_by_label() == {"full": (100, 1)}


def test_resolve_capacity():
    assert resolve_prefix_cache_bytes(None, 1000) == 0
    assert resolve_prefix_cache_bytes("auto", 1000) == 250
    assert resolve_prefix_cache_bytes("auto", None) == 1 << 30
    assert resolve_prefix_cache_bytes(5000, 1000) == 1000
    with pytest.raises(ValueError):
        resolve_prefix_cache_bytes(-1, None)
