"""HiP `search=exact`: the top key blocks by HiP's block score, against brute force and inside a session."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.hip.exact_search import exact_search, top_blocks
from kvmux.policies.hip.search import block_score_table, hip_search, keys_by_offset
from kvmux.policies.sparse import SparseGeometry
from tests.policies.helpers import new_session, stepwise_logits

SMALL = dict(mask_k=32, sink_tokens=4, window=16, block_size_q=16, dense_layers=0)  # budget 52


def brute_force_top(q, k, geo, groups, block_k, stride):
    """Per (batch, head, query block): the set of the `groups` best candidate blocks, scored one by one."""
    queries = geo.query_blocks(q)[..., ::stride, :]  # [B, Hq, nQB, S, D]
    b, hq, nqb = queries.shape[:3]
    rep = hq // k.shape[1]
    chosen = {}
    for i in range(b):
        for h in range(hq):
            keys = k[i, h // rep]
            for j in range(nqb):
                lo, hi = int(geo.lo[j]), int(geo.hi[j])
                scores = {}
                for block in range(lo, hi):
                    tokens = keys[block * block_k : min((block + 1) * block_k, keys.shape[0])]
                    scores[block] = float((queries[i, h, j] @ tokens.T).max())
                chosen[i, h, j] = set(sorted(scores, key=scores.get, reverse=True)[:groups])
    return chosen


@pytest.mark.parametrize(
    "tq,tk,bq,bk,sinks,window,groups",
    [(70, 300, 8, 2, 5, 20, 8), (33, 200, 16, 4, 0, 3, 6), (1, 180, 1, 2, 16, 30, 10), (40, 90, 8, 2, 4, 16, 64)],
)
def test_exact_search_selects_the_best_blocks_by_brute_force(tq, tk, bq, bk, sinks, window, groups):
    torch.manual_seed(tq * tk)
    q, k = torch.randn(2, 6, tq, 16), torch.randn(2, 3, tk, 16)
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead=0, device=q.device)
    stride = 2 if bq > 1 else 1
    sel = exact_search(geo.query_blocks(q), k, geo.lo, geo.hi, groups, bk, query_stride=stride)
    assert sel.blocks.shape == (2, 6, geo.lo.shape[0], groups) and sel.rounds == 0
    want = brute_force_top(q, k, geo, groups, bk, stride)
    for (i, h, j), blocks in want.items():
        got = sel.blocks[i, h, j][sel.valid[i, h, j]].tolist()
        assert got == sorted(blocks)  # sorted ids, each once; fewer candidates than groups: all of them


def test_one_query_row_scored_in_place_selects_as_the_table():
    torch.manual_seed(3)
    q, k = torch.randn(1, 6, 1, 32), torch.randn(1, 3, 901, 32)
    geo = SparseGeometry.build(1, 901, 1, 2, 16, 64, lookahead=7, device=q.device)
    queries, blocks = geo.query_blocks(q), int(geo.hi.max())
    row = exact_search(queries, k, geo.lo, geo.hi, 16, 2)
    table = top_blocks(block_score_table(queries, keys_by_offset(k, blocks, 2), blocks), geo.lo, geo.hi, 16)
    assert torch.equal(row.blocks, table.blocks) and bool(row.valid.all())


def test_an_isolated_spike_is_kept_by_the_exact_search_and_pruned_by_the_hierarchical_one():
    """Keys whose score rises toward the end (a recency slope) and one spike block early on, off its
    branch's center: the branch-and-prune rounds score the spike's branch by an ordinary center block and
    drop it; the exact top blocks keep it."""
    d, num_blocks, groups = 16, 512, 32
    q = torch.zeros(d)
    q[0] = 1.0
    keys = torch.zeros(num_blocks * 2, d)
    keys[:, 0] = torch.linspace(0.0, 1.0, num_blocks * 2)  # score = position / T
    spike = 40  # group 2 covers blocks 32-47; its halves' centers are blocks 36 and 44
    keys[spike * 2, 0] = 10.0
    k, query = keys.view(1, 1, -1, d), q.view(1, 1, 1, 1, d)
    lo, hi = torch.tensor([0]), torch.tensor([num_blocks])
    hierarchical = hip_search(query, k, lo, hi, groups, 2)
    exact = exact_search(query, k, lo, hi, groups, 2)
    assert spike not in hierarchical.blocks.flatten().tolist()
    assert spike in exact.blocks.flatten().tolist()
    assert exact.blocks.flatten().tolist() == [spike] + list(range(num_blocks - groups + 1, num_blocks))


def test_a_session_with_exact_search_decodes_as_one_query_blocks_and_stays_in_budget(tiny_llama):
    """Prefill and decode both select with the exact search: decode with a refresh every step equals a
    one-pass prefill with one-query blocks, chunked prefill equals one pass, and the answer differs from
    the hierarchical search's (the exact path ran)."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 260))
    exact = {**SMALL, "search": "exact"}
    per_step = stepwise_logits(new_session("hip", info, **exact, refresh_interval=1), runner, ids, chunk=1)
    single = new_session("hip", info, **{**exact, "block_size_q": 1, "block_stride_q": 1})
    torch.testing.assert_close(per_step, stepwise_logits(single, runner, ids, chunk=260), atol=2e-5, rtol=1e-4)
    session = new_session("hip", info, **exact)
    chunked = stepwise_logits(session, runner, ids, chunk=32)
    whole = stepwise_logits(new_session("hip", info, **exact), runner, ids, chunk=260)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
    stats = session.stats()
    assert stats.extra["hip_max_keys_per_query"] == 32 + 4 + 16 and stats.extra["hip_rounds"] == 0
    hierarchical = stepwise_logits(new_session("hip", info, **SMALL), runner, ids, chunk=260)
    assert not torch.allclose(whole, hierarchical, atol=1e-4)


def test_exact_layers_takes_the_exact_top_blocks_below_the_index_only(tiny_llama, monkeypatch):
    """exact_layers=1 on the 2-layer model: layer 0 selects with the exact search and layer 1 with the
    hierarchical one, in prefill and in decode refreshes; exact_layers=0 is the paper's search and
    exact_layers >= the layer count equals search=exact."""
    from kvmux.policies.hip import policy as hip

    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 200))
    ran: list[tuple[int, str]] = []
    layer = {"now": -1}
    select, exact, hierarchical, row = hip.HipSession.select, hip.exact_search, hip.hip_search, hip.search_row

    def recording_select(self, call, *args, **kwargs):
        layer["now"] = call.layer_idx
        return select(self, call, *args, **kwargs)

    def recording_row(query, *args, **kwargs):  # the decode refresh's hierarchical search on CPU
        ran.append((-1, "hierarchical row"))
        return row(query, *args, **kwargs)

    def recording(kind, search):
        def run(*args, **kwargs):
            ran.append((layer["now"], kind))
            return search(*args, **kwargs)

        return run

    monkeypatch.setattr(hip.HipSession, "select", recording_select)
    monkeypatch.setattr(hip, "exact_search", recording("exact", exact))
    monkeypatch.setattr(hip, "hip_search", recording("hierarchical", hierarchical))
    monkeypatch.setattr(hip, "search_row", recording_row)
    mixed = stepwise_logits(new_session("hip", info, **SMALL, exact_layers=1), runner, ids, chunk=100)
    assert set(ran) == {(0, "exact"), (1, "hierarchical")}
    ran.clear()
    decode = new_session("hip", info, **SMALL, exact_layers=1, refresh_interval=1)
    stepwise_logits(decode, runner, ids[:, :120], chunk=1)
    assert (0, "exact") in ran and {kind for at, kind in ran if at != 0} == {"hierarchical row"}
    paper = stepwise_logits(new_session("hip", info, **SMALL, exact_layers=0), runner, ids, chunk=100)
    torch.testing.assert_close(paper, stepwise_logits(new_session("hip", info, **SMALL), runner, ids, chunk=100))
    every = stepwise_logits(new_session("hip", info, **SMALL, exact_layers=2), runner, ids, chunk=100)
    all_exact = stepwise_logits(new_session("hip", info, **SMALL, search="exact"), runner, ids, chunk=100)
    torch.testing.assert_close(every, all_exact)
    assert not torch.allclose(mixed, paper, atol=1e-4)  # layer 0's exact blocks change the output
    assert not torch.allclose(mixed, all_exact, atol=1e-4)  # and layer 1 still searches hierarchically
