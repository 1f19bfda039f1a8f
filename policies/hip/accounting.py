"""HiP's key accounting: how many keys a session's queries attended, for `attention_density` and
`hip_max_keys_per_query` (HiP, arXiv 2406.09827, attends at most k + sinks + window keys per query).

Dense calls add their causal key count on the host. Sparse calls report a count per query row, kept
on the device so that no call waits for the device: a prefill call's counts are added at once, a decode
step's few counts wait and are added in bulk (every 256 calls, or when a statistic is read). The Triton
attention adds its counts into the same device totals itself (`totals_on`).
"""

from __future__ import annotations

import torch

from kvmux.policies.base import AttentionCall
from kvmux.policies.retrieval_heads import visible_keys

BULK_CALLS = 256  # decode calls whose counts wait before they are added
SMALL_CALL_ROWS = 64  # a call with more counted rows than this is added at once


def causal_keys(call: AttentionCall) -> float:
    """Keys dense causal attention sees in a call, summed over its query rows and every head."""
    return visible_keys(call, call.query.shape[1])


class AttendedKeys:
    """Keys attended and keys dense attention would have seen, over a session's calls."""

    def __init__(self) -> None:
        self.dense_sum = 0.0  # keys attended on dense calls and dense heads, summed over rows and heads
        self.causal_sum = 0.0  # keys dense causal attention would see, every call
        self.sparse_totals: torch.Tensor | None = None  # int64 [sum, max] over sparse rows, on the device
        self._pending: list[torch.Tensor] = []

    def add_dense_call(self, call: AttentionCall) -> None:
        visible = causal_keys(call)
        self.dense_sum += visible
        self.causal_sum += visible

    def add_sparse_counts(self, counts: torch.Tensor) -> None:
        """A sparse call's keys per row; a decode row's few counts wait to be added in bulk."""
        self._pending.append(counts.flatten())
        if counts.numel() > SMALL_CALL_ROWS or len(self._pending) >= BULK_CALLS:
            self.flush()

    def totals_on(self, device: torch.device) -> torch.Tensor:
        """The device totals, created on first use (the Triton attention adds into them)."""
        if self.sparse_totals is None:
            self.sparse_totals = torch.zeros(2, dtype=torch.int64, device=device)
        return self.sparse_totals

    @torch.inference_mode()
    def flush(self) -> None:
        if not self._pending:
            return
        counts = torch.cat(self._pending)
        self._pending = []
        totals = self.totals_on(counts.device)
        totals[0] += counts.sum()
        totals[1] = torch.maximum(totals[1], counts.max())

    @property
    def max_per_row(self) -> int:
        """Most keys any query row attended on the sparse path."""
        self.flush()
        return int(self.sparse_totals[1]) if self.sparse_totals is not None else 0

    def density(self) -> float:
        """Keys attended over keys dense causal attention would see (1.0 before any call)."""
        self.flush()
        if not self.causal_sum:
            return 1.0
        sparse = float(self.sparse_totals[0]) if self.sparse_totals is not None else 0.0
        return (self.dense_sum + sparse) / max(self.causal_sum, 1.0)
