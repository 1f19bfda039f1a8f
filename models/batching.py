"""Batched decode across requests: one forward for the linear layers, attention per request.

Sessions keep their own caches (different lengths, different policies). `RowSplitCache` is the
cache the model sees during a batched decode step: it appends each row's new K/V to that row's
own session cache and remembers what the session cache returned, and the kvmux attention function
then runs each row's attention through its own session. The weights are read once for the whole
batch, which is where decode time goes on small batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

if TYPE_CHECKING:
    from kvmux.models.lean_decode import LeanDecoder
    from kvmux.policies.base import PolicySession


class BatchRowError(Exception):
    """Rows (requests) of a batched decode failed: `failures` maps a batch row to its exception.

    `logits` is None when the forward stopped part-way (the other rows must be undone and re-run),
    or the whole batch's logits [B, V] when only a row's `after_forward` failed (the others are done).
    """

    def __init__(self, failures: dict[int, BaseException], logits: torch.Tensor | None = None):
        super().__init__("; ".join(f"row {row}: {type(e).__name__}: {e}" for row, e in failures.items()))
        self.failures = failures
        self.logits = logits


class RowSplitCache(Cache):
    """A pass-through cache for one batched decode forward (batch row i = sessions[i])."""

    def __init__(self, sessions: list[PolicySession]):
        super().__init__(layers=[])
        self.sessions = sessions
        self.rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = []
        for i, session in enumerate(self.sessions):
            with self.row(i):
                rows.append(session.cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx))
        self.rows[layer_idx] = rows
        return key_states, value_states

    @contextmanager
    def row(self, index: int) -> Iterator[None]:
        """Tag an exception raised by one row's session with that row."""
        try:
            yield
        except BatchRowError:
            raise
        except Exception as exc:
            raise BatchRowError({index: exc}) from exc

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def batched_decode_forward(
    model: torch.nn.Module,
    sessions: list[PolicySession],
    ids: torch.Tensor,
    cache_kw: str,
    lean: LeanDecoder | None = None,
) -> torch.Tensor:
    """Feed one token per session (`ids` [B, 1]) in a single forward; returns logits [B, V]."""
    positions = torch.cat([s.next_position_ids(1) for s in sessions], dim=0)
    cache = RowSplitCache(sessions)
    if lean is not None:
        logits = lean.decode(ids, positions, cache, kvmux_batch=cache)[:, -1].float()
    else:
        # a 4-D mask is passed through untouched; each row's attention runs in its own session
        mask = torch.ones(len(sessions), 1, 1, 1, dtype=torch.bool, device=ids.device)
        out = model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            kvmux_batch=cache,
            **{cache_kw: cache},
        )
        logits = out.logits[:, -1].float()
    failures: dict[int, BaseException] = {}
    for row, session in enumerate(sessions):
        try:
            session.forward_done(1)
        except Exception as exc:  # noqa: BLE001 - one request's fault must not fail the batch
            failures[row] = exc
    if failures:
        raise BatchRowError(failures, logits)
    return logits
