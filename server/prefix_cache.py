"""Automatic prefix cache: the state a policy session holds after a prompt prefix, reused by later
requests whose prompts extend that prefix with the same policy configuration.

Prompt tokens are cut into blocks of `block_tokens`; block i's hash chains the hash of block i-1
with block i's tokens, so one hash names a whole prefix (the scheme of vLLM's automatic prefix
caching). An entry is one session state after `length` prompt tokens, keyed by a configuration
string (model, policy, every parameter value). It is indexed under the chained hash of each of its
whole blocks, so a lookup walks the request's blocks from the longest prefix down to a hash the
index knows, then checks the tokens themselves (a hash collision can never serve a wrong state).

What a state may serve is the policy's declaration (`kvmux.policies.prefix.PrefixReuse`): a
`truncatable` state (every token's K/V kept, a function of the tokens before it) serves any shorter
multiple of its `granularity`; any other state serves exactly its own length. The cache itself knows
nothing of policies: states are opaque objects with a byte size.

Memory: entries are held up to `capacity_bytes`, least recently used evicted first; an entry being
copied into a session is pinned and never evicted. `evict(n)` frees bytes for admission control
(the server's KV memory budget counts cached entries).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BLOCK_TOKENS = 64


def chained_block_hashes(key: str, ids: Sequence[int], block_tokens: int, num_blocks: int) -> list[int]:
    """Hashes of the first `num_blocks` whole blocks of `ids`, each chained to the one before it."""
    hashes, previous = [], hash(key)
    for i in range(num_blocks):
        previous = hash((previous, tuple(ids[i * block_tokens : (i + 1) * block_tokens])))
        hashes.append(previous)
    return hashes


@dataclass(eq=False)
class CacheEntry:
    """One cached state: the session state after `tokens` (its first `len(tokens)` prompt tokens)."""

    key: str
    label: str  # metrics label (the policy name)
    tokens: tuple[int, ...]
    state: Any
    nbytes: int
    truncatable: bool
    granularity: int
    block_hashes: list[int] = field(default_factory=list)
    pins: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def usable_length(self, ids: Sequence[int], max_length: int) -> int:
        """Longest prefix of `ids` (at most `max_length`) this entry can serve; 0 if none."""
        if not self.truncatable:
            n = self.length
            return n if n <= max_length and tuple(ids[:n]) == self.tokens else 0
        limit = min(self.length, max_length, len(ids))
        common = _common_prefix(self.tokens, ids, limit)
        return common // self.granularity * self.granularity


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit` (compared in slices, then token by token)."""
    step, n = 256, 0
    while n < limit:
        stop = min(n + step, limit)
        if tuple(a[n:stop]) == tuple(b[n:stop]):
            n = stop
            continue
        while n < stop and a[n] == b[n]:
            n += 1
        return n
    return n


@dataclass
class CacheHit:
    entry: CacheEntry
    length: int  # prompt tokens served from the entry


@dataclass
class CacheCounters:
    """Per-label counters (read by the metrics)."""

    hits: int = 0
    misses: int = 0
    tokens_served: int = 0
    evictions: int = 0
    stored: int = 0


class PrefixCache:
    """Entries of session states indexed by chained block hashes; LRU within a byte capacity."""

    def __init__(self, capacity_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.block_tokens = block_tokens
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()  # id(entry) -> entry, LRU first
        self._index: dict[int, list[CacheEntry]] = {}
        self._lock = threading.Lock()
        self.bytes_held = 0
        self.counters: dict[str, CacheCounters] = {}
        # set by a scheduler with a KV memory budget: the bytes entries may hold now (budget - reserved)
        self.room: Callable[[], int] | None = None

    # -- reading ---------------------------------------------------------------------------------
    def lookup(self, key: str, label: str, ids: Sequence[int], max_length: int) -> CacheHit | None:
        """The longest cached prefix of `ids` (at most `max_length` tokens) for `key`, pinned (call
        `release` once its state is copied); None on a miss (counted)."""
        with self._lock:
            counters = self._counters(label)
            blocks = min(max_length, len(ids)) // self.block_tokens
            hashes = chained_block_hashes(key, ids, self.block_tokens, blocks)
            best: CacheHit | None = None
            for i in range(len(hashes) - 1, -1, -1):
                for entry in self._index.get(hashes[i], ()):
                    if entry.key != key:
                        continue
                    length = entry.usable_length(ids, max_length)
                    if length and (best is None or length > best.length):
                        best = CacheHit(entry, length)
                if best is not None:
                    break
            if best is None:
                counters.misses += 1
                return None
            best.entry.pins += 1
            self._entries.move_to_end(id(best.entry))
            counters.hits += 1
            counters.tokens_served += best.length
            return best

    def release(self, hit: CacheHit) -> None:
        with self._lock:
            hit.entry.pins -= 1

    # -- writing ---------------------------------------------------------------------------------
    def offer(
        self,
        key: str,
        label: str,
        tokens: Sequence[int],
        state: Any,
        nbytes: int,
        truncatable: bool,
        granularity: int,
    ) -> bool:
        """Store a state for the prefix `tokens`; False when it cannot fit (or covers no whole block)."""
        blocks = len(tokens) // self.block_tokens
        capacity = self.capacity_bytes if self.room is None else min(self.capacity_bytes, self.room())
        if blocks == 0 or nbytes > capacity:
            return False
        entry = CacheEntry(key, label, tuple(tokens), state, nbytes, truncatable, max(1, granularity))
        entry.block_hashes = chained_block_hashes(key, tokens, self.block_tokens, blocks)
        if not truncatable:  # serves exactly its length: indexed under its last whole block only
            entry.block_hashes = entry.block_hashes[-1:]
        with self._lock:
            if self._covered(entry):
                return False
            self._drop_subsumed(entry)
            self._evict_until(capacity - nbytes)
            if self.bytes_held + nbytes > capacity:
                return False
            self._entries[id(entry)] = entry
            for h in entry.block_hashes:
                self._index.setdefault(h, []).append(entry)
            self.bytes_held += nbytes
            self._counters(label).stored += 1
            return True

    def evict(self, num_bytes: int) -> int:
        """Free at least `num_bytes` (least recently used first, pinned entries kept); bytes freed."""
        with self._lock:
            before = self.bytes_held
            self._evict_until(self.bytes_held - num_bytes)
            return before - self.bytes_held

    def clear(self) -> None:
        with self._lock:
            for entry in [e for e in self._entries.values() if not e.pins]:
                self._remove(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def held_by_label(self) -> dict[str, tuple[int, int]]:
        """label -> (bytes, entries) held now."""
        with self._lock:
            held: dict[str, tuple[int, int]] = {}
            for entry in self._entries.values():
                nbytes, count = held.get(entry.label, (0, 0))
                held[entry.label] = (nbytes + entry.nbytes, count + 1)
            return held

    # -- internals (lock held) -----------------------------------------------------------------
    def _counters(self, label: str) -> CacheCounters:
        return self.counters.setdefault(label, CacheCounters())

    def _covered(self, new: CacheEntry) -> bool:
        """An entry already serves everything `new` would (same key, a truncatable superset)."""
        for entry in self._index.get(new.block_hashes[-1], ()):
            if entry.key == new.key and entry.truncatable and entry.granularity == new.granularity:
                if entry.length >= new.length and entry.tokens[: new.length] == new.tokens:
                    return new.truncatable or new.length % entry.granularity == 0
        return False

    def _drop_subsumed(self, new: CacheEntry) -> None:
        """A truncatable entry makes the shorter entries it extends redundant (e.g. a chat's earlier turn)."""
        if not new.truncatable:
            return
        for h in new.block_hashes:
            for entry in list(self._index.get(h, ())):
                if (
                    entry.key == new.key
                    and not entry.pins
                    and entry.length <= new.length
                    and entry.length % new.granularity == 0
                    and new.tokens[: entry.length] == entry.tokens
                ):
                    self._remove(entry)

    def _evict_until(self, target_bytes: int) -> None:
        for entry in list(self._entries.values()):
            if self.bytes_held <= target_bytes:
                return
            if not entry.pins:
                self._remove(entry)
                self._counters(entry.label).evictions += 1

    def _remove(self, entry: CacheEntry) -> None:
        self._entries.pop(id(entry), None)
        for h in entry.block_hashes:
            bucket = self._index.get(h)
            if bucket and entry in bucket:
                bucket.remove(entry)
                if not bucket:
                    del self._index[h]
        self.bytes_held -= entry.nbytes
        entry.state = None


AUTO_SHARE_OF_KV_BUDGET = 0.25
AUTO_BYTES_WITHOUT_BUDGET = 1 << 30


def resolve_prefix_cache_bytes(setting: int | str | None, kv_budget: int | None) -> int:
    """`prefix_cache_bytes`: None or 0 = off; `auto` = a quarter of the KV memory budget (1 GiB when the
    budget is unknown); an int = that many bytes (at most the budget: admission counts cached entries)."""
    if setting is None:
        return 0
    if setting == "auto":
        return int(kv_budget * AUTO_SHARE_OF_KV_BUDGET) if kv_budget else AUTO_BYTES_WITHOUT_BUDGET
    if not isinstance(setting, int) or setting < 0:
        raise ValueError(f"prefix_cache_bytes must be a byte count >= 0, 'auto' or null, got {setting!r}")
    return min(setting, kv_budget) if kv_budget else setting
