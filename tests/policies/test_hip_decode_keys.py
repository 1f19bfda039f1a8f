"""HiP's decode rows with the selection gathered once per refresh, against the shared key-block layer."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.hip.decode_keys import decode_attention, gather_selection
from kvmux.policies.hip.search import hip_search
from kvmux.policies.sparse import SparseGeometry, key_block_attention
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
