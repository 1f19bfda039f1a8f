"""HiP's decode rows with the selection gathered once per refresh, against the shared key-block layer."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.hip.decode_keys import MASK_STEPS, decode_attention, gather_selection
from kvmux.policies.hip.search import hip_search, search_row
from kvmux.policies.sparse import SparseGeometry, key_block_attention
from kvmux.policies.sparse.selection import last_query_candidates
from tests.policies.helpers import new_session, run_prefill
from tests.policies.test_sparse import selection_oracle


@pytest.mark.parametrize("bk,sinks,window,groups,lookahead", [(2, 5, 20, 8, 3), (4, 0, 9, 6, 0), (1, 16, 30, 40, 7)])
def test_gathered_decode_rows_match_the_oracle_over_a_refresh(bk, sinks, window, groups, lookahead):
    """A selection searched with look-ahead at one step serves the next steps: each step equals the
    dense-mask oracle and the key-block layer, keys counted alike."""
    torch.manual_seed(bk + window)
    tk = 240
    q, k, v = torch.randn(2, 6, lookahead + 1, 16), torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    first = tk - lookahead
    geo = SparseGeometry.build(1, first, 1, bk, sinks, window, lookahead=lookahead, device=q.device)
    sel = hip_search(geo.query_blocks(q[:, :, :1]), k[:, :, :first], geo.lo, geo.hi, groups, bk, query_stride=1)
    gathered = gather_selection(sel, k[:, :, :first], v[:, :, :first], bk, sinks)
    for step in range(lookahead + 1):  # the cache grows by one token per step; the selection stays
        length = first + step
        row = q[:, :, step : step + 1]
        keys, values = k[:, :, :length], v[:, :, :length]
        out, counts = decode_attention(row, keys, values, gathered, window, 0.25)
        step_geo = SparseGeometry.build(1, length, 1, bk, sinks, window, lookahead=0, device=q.device)
        want, want_counts = selection_oracle(row, keys, values, sel, step_geo, 0.25)
        layer, layer_counts = key_block_attention(row, keys, values, sel, step_geo, 0.25, backend="fast")
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, layer, atol=1e-5, rtol=1e-4)
        assert torch.equal(counts, want_counts) and torch.equal(counts, layer_counts)


def test_decode_on_the_gathered_path_equals_the_reference_kernel(tiny_llama):
    """Greedy decode over three refreshes: logits, key counts and density as with the reference kernel."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 150))
    small = dict(mask_k=32, sink_tokens=4, window=16, block_size_q=16, dense_layers=0, refresh_interval=4)
    runs = []
    for kernel in ("reference", "fast"):
        session = new_session("hip", info, **small, kernel=kernel)
        logits = [run_prefill(session, runner, ids)]
        for _ in range(11):
            logits.append(session.decode(runner, int(logits[-1].argmax())))
        runs.append((torch.stack(logits), session.stats()))
    (ref_logits, ref_stats), (fast_logits, fast_stats) = runs
    torch.testing.assert_close(fast_logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert fast_stats.extra == ref_stats.extra
    assert fast_stats.attention_density == pytest.approx(ref_stats.attention_density)


def _block_sets(sel) -> torch.Tensor:
    return torch.where(sel.valid, sel.blocks, -1).sort(-1).values


@pytest.mark.parametrize(
    "tk,lo,hi,groups,bk", [(400, 2, 180, 16, 2), (97, 0, 97, 8, 1), (64, 3, 10, 16, 4), (50, 5, 5, 4, 2)]
)
def test_row_search_selects_what_the_general_search_selects(tk, lo, hi, groups, bk):
    """Host-side range, shifts and [start, end) pairs: the same blocks and rounds as `hip_search`,
    including fewer candidates than groups and an empty range."""
    torch.manual_seed(tk + groups)
    q, k = torch.randn(2, 6, 1, 16), torch.randn(2, 3, tk, 16)
    want = hip_search(q[:, :, :, None], k, torch.tensor([lo]), torch.tensor([hi]), groups, bk, score_mode="table")
    got = search_row(q, k, lo, hi, groups, bk)
    assert torch.equal(_block_sets(got), _block_sets(want)) and got.rounds == want.rounds
    assert got.blocks.shape == want.blocks.shape


def test_masks_are_recomputed_past_the_precomputed_steps():
    """A refresh longer than `MASK_STEPS`: every step still equals the dense-mask oracle."""
    torch.manual_seed(3)
    bk, sinks, window, lookahead, tk = 2, 4, 24, MASK_STEPS + 5, 200
    q, k, v = torch.randn(1, 4, lookahead + 1, 8), torch.randn(1, 2, tk, 8), torch.randn(1, 2, tk, 8)
    first = tk - lookahead
    geo = SparseGeometry.build(1, first, 1, bk, sinks, window, lookahead=lookahead, device=q.device)
    sel = search_row(q[:, :, :1], k[:, :, :first], int(geo.lo[0]), int(geo.hi[0]), 10, bk)
    gathered = gather_selection(sel, k[:, :, :first], v[:, :, :first], bk, sinks)
    for step in range(lookahead + 1):
        length = first + step
        row, keys, values = q[:, :, step : step + 1], k[:, :, :length], v[:, :, :length]
        out, counts = decode_attention(row, keys, values, gathered, window, 0.3)
        step_geo = SparseGeometry.build(1, length, 1, bk, sinks, window, lookahead=0, device=q.device)
        want, want_counts = selection_oracle(row, keys, values, sel, step_geo, 0.3)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(counts, want_counts)


@pytest.mark.parametrize(
    "num_keys,bk,sinks,window,lookahead", [(240, 2, 5, 20, 3), (30, 4, 16, 40, 0), (97, 1, 0, 9, 7)]
)
def test_host_candidate_range_is_the_geometry_of_the_last_query(num_keys, bk, sinks, window, lookahead):
    geo = SparseGeometry.build(1, num_keys, 1, bk, sinks, window, lookahead=lookahead, device=torch.device("cpu"))
    lo, hi = last_query_candidates(num_keys, bk, sinks, window, lookahead)
    assert (lo, hi) == (int(geo.lo[0]), int(geo.hi[0])) and geo.max_candidates == hi - lo
