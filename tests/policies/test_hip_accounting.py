"""HiP's key accounting: density and the most keys per row, with decode counts added in bulk."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvmux.policies.hip.accounting import BULK_CALLS, AttendedKeys, causal_keys


def _call(tq: int, tk: int, heads: int = 2):
    return SimpleNamespace(query=torch.zeros(1, heads, tq, 4), key=torch.zeros(1, 1, tk, 4))


def test_causal_keys_counts_the_triangle_below_the_cached_keys():
    assert causal_keys(_call(tq=3, tk=10)) == 2 * (3 * 7 + 6)


def test_decode_counts_wait_then_add_in_bulk_and_reads_flush_them():
    keys = AttendedKeys()
    keys.causal_sum = 1000.0
    for _ in range(BULK_CALLS - 1):
        keys.add_sparse_counts(torch.tensor([[[3]], [[5]]]))
    assert keys.sparse_totals is None  # still waiting
    keys.add_sparse_counts(torch.tensor([[[2]], [[9]]]))
    assert keys.sparse_totals.tolist() == [8 * (BULK_CALLS - 1) + 11, 9]
    keys.add_sparse_counts(torch.tensor([[[40]]]))
    assert keys.max_per_row == 40  # a read adds what waits
    assert keys.density() == (8 * (BULK_CALLS - 1) + 11 + 40) / 1000.0


def test_a_large_call_is_added_at_once_and_dense_calls_count_as_seen():
    keys = AttendedKeys()
    assert keys.density() == 1.0 and keys.max_per_row == 0
    keys.add_sparse_counts(torch.full((1, 2, 40), 7))  # 80 rows
    assert keys.sparse_totals.tolist() == [560, 7]
    keys.causal_sum += 1000.0
    keys.add_dense_call(_call(tq=1, tk=100))
    assert keys.density() == (560 + 200) / 1200.0
