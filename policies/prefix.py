"""What a policy session can hand to the prefix cache, and how its state is copied out and back in.

A policy declares with `Policy.prefix_reuse(params, info, chunk)` whether the state its session holds
after a prompt prefix may start another request whose prompt extends that prefix (`PrefixReuse`), or
returns None (nothing shared, the default). The session then copies its state out with
`export_prefix(length)` and a new session adopts a copy with `import_prefix(state)`.

The default export/import below serve sessions whose cache layers hold every token's keys and values
in order (`GrowableCache`): a prefix of each layer is cloned, and importing appends the clone to the
new session's empty cache (one copy; the cached tensors are never written afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True, slots=True)
class PrefixReuse:
    """How a policy's state after a prefix may be reused.

    granularity: a reusable prefix length is a multiple of this (e.g. a query block or a prefill
        chunk, where the state after the prefix does not depend on the tokens that follow).
    truncatable: the state after L tokens can be cut to serve any shorter multiple of the
        granularity (every token's K/V kept in order); otherwise a state serves exactly its length.
    min_tail: prompt tokens that must still be prefilled after the reused prefix (at least 1, for
        the logits of the last prompt token; more when the policy reads the prompt's last rows).
    exact: the restored session computes what a fresh prefill computes (up to float rounding);
        False when the reused state depended on tokens after the prefix (the docs give the measured
        difference).
    """

    granularity: int = 1
    truncatable: bool = True
    min_tail: int = 1
    exact: bool = True

    def snapshot_length(self, num_tokens: int) -> int:
        """The longest prefix of an `num_tokens`-token prompt worth keeping (a multiple of the granularity)."""
        limit = num_tokens if self.truncatable else num_tokens - self.min_tail
        return max(limit, 0) // self.granularity * self.granularity


@dataclass(slots=True)
class PrefixState:
    """A session's state after `length` prompt tokens: per-layer tensors plus policy extras."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor] | None]
    extra: Any = None

    @property
    def nbytes(self) -> int:
        total = 0
        for pair in self.layers:
            if pair is not None:
                total += sum(t.numel() * t.element_size() for t in pair)
        return total + _extra_bytes(self.extra)


def _extra_bytes(extra: Any) -> int:
    if torch.is_tensor(extra):
        return extra.numel() * extra.element_size()
    if isinstance(extra, (list, tuple)):
        return sum(_extra_bytes(e) for e in extra)
    if isinstance(extra, dict):
        return sum(_extra_bytes(e) for e in extra.values())
    return 0


def export_cache_prefix(cache: Cache, length: int) -> PrefixState:
    """Clone the first `length` positions of every layer of a cache that keeps every token in order."""
    layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not torch.is_tensor(keys) or keys.numel() == 0:
            layers.append(None)
            continue
        if keys.shape[-2] < length:
            raise ValueError(f"a layer holds {keys.shape[-2]} positions, fewer than the prefix's {length}")
        layers.append((keys[..., :length, :].clone(), values[..., :length, :].clone()))
    return PrefixState(length, layers)


def import_cache_prefix(cache: Cache, state: PrefixState, length: int) -> None:
    """Append a copy of the first `length` positions of `state`'s tensors to the layers of an empty cache."""
    if length > state.length:
        raise ValueError(f"the state holds {state.length} positions, fewer than {length}")
    for idx, pair in enumerate(state.layers):
        if pair is None:
            continue
        while len(cache.layers) <= idx:  # caches built without a config create layers lazily
            cache.layers.append(cache.layer_class_to_replicate())
        keys, values = pair
        cache.layers[idx].update(keys[..., :length, :], values[..., :length, :])
