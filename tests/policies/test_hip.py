"""HiP: its selections through the sparse layer vs a dense-mask oracle, the branch-and-prune search, mask reuse."""

from __future__ import annotations

import pytest
import torch

from kvmux.models.runner import Runner
from kvmux.policies.base import AttentionCall
from kvmux.policies.dense import sdpa
from kvmux.policies.hip.policy import HipParams
from kvmux.policies.hip.search import (
    block_score_row,
    block_score_table,
    choose_score_mode,
    hip_search,
    keys_by_offset,
)
from kvmux.policies.sparse import SparseGeometry, key_block_attention
from tests.policies.helpers import full_logits, new_session, run_prefill, stepwise_logits
from tests.policies.test_sparse import selection_oracle

SMALL = dict(mask_k=32, sink_tokens=4, window=16, block_size_q=16, dense_layers=0)  # budget 52


@pytest.mark.parametrize(
    "tq,tk,bq,bk,sinks,window,groups,mode",
    [
        (70, 300, 8, 2, 5, 20, 8, "gather"),
        (70, 300, 8, 2, 5, 20, 8, "table"),
        (64, 64, 16, 2, 4, 8, 4, "auto"),  # prefill from empty: first windows start before key 0
        (33, 200, 16, 4, 0, 3, 6, "gather"),  # no sinks, window < b_q, partial last query block
        (1, 180, 1, 2, 16, 30, 10, "table"),  # decode shape
        (40, 260, 32, 1, 7, 64, 5, "table"),
    ],
)
def test_fast_and_reference_match_dense_mask_oracle(tq, tk, bq, bk, sinks, window, groups, mode):
    torch.manual_seed(tq + tk)
    q, k, v = torch.randn(2, 6, tq, 16), torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead=0, device=q.device)
    stride = 2 if bq > 1 else 1
    sel = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, groups, bk, query_stride=stride, score_mode=mode)
    want, want_counts = selection_oracle(q, k, v, sel, geo, 0.25)
    for kernel in ("reference", "fast"):
        out, counts = key_block_attention(q, k, v, sel, geo, 0.25, backend=kernel)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(counts, want_counts)
        assert int(counts.max()) <= sinks + groups * bk + window


def test_every_candidate_selected_is_exact_dense_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
    geo = SparseGeometry.build(50, 120, 16, 2, 3, 10, lookahead=0, device=q.device)
    sel = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, 64, 2, query_stride=2)
    assert bool(sel.valid.sum(-1).eq(geo.hi - geo.lo).all()) and sel.rounds == 0
    for kernel in ("reference", "fast"):
        out, counts = key_block_attention(q, k, v, sel, geo, 0.25, backend=kernel)
        torch.testing.assert_close(out, sdpa(q, k, v, None, 0.25), atol=1e-5, rtol=1e-4)
        assert counts[0, 0].tolist() == list(range(71, 121))  # query at position p sees p + 1 keys


def test_gather_and_table_scoring_select_the_same_blocks():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 96, 32), torch.randn(1, 2, 900, 32)
    geo = SparseGeometry.build(96, 900, 32, 2, 16, 64, lookahead=0, device=q.device)
    a = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, 32, 2, query_stride=2, score_mode="gather")
    b = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, 32, 2, query_stride=2, score_mode="table")
    assert a.rounds == b.rounds == 4  # ~400 candidate blocks in 32 groups of ~13: 4 halvings
    assert torch.equal(a.blocks, b.blocks) and torch.equal(a.valid, b.valid)
    assert bool(a.valid.all())
    in_range = (a.blocks >= geo.lo.view(1, 1, -1, 1)) & (a.blocks < geo.hi.view(1, 1, -1, 1))
    assert bool(in_range.all())  # never a sink or window block


@pytest.mark.parametrize("tk,bk,lookahead", [(901, 2, 7), (640, 4, 0), (300, 1, 3)])
def test_a_decode_row_scores_its_table_in_place_and_selects_as_gathering(tk, bk, lookahead):
    """One query row: the table from the keys as they lie (blocks past the cache repeat its last key)
    equals the per-offset table, and the search selects what the gathering search selects."""
    torch.manual_seed(tk)
    q, k = torch.randn(2, 6, 1, 32), torch.randn(2, 3, tk, 32)
    geo = SparseGeometry.build(1, tk, 1, bk, 16, 64, lookahead=lookahead, device=q.device)
    queries, blocks = geo.query_blocks(q), tk // bk + 2  # the last blocks run past the cache
    want = block_score_table(queries, keys_by_offset(k, blocks, bk), blocks)
    torch.testing.assert_close(block_score_row(queries, k, blocks, bk), want, atol=1e-5, rtol=1e-6)  # fp32 GEMMs round
    a = hip_search(queries, k, geo.lo, geo.hi, 16, bk, query_stride=1, score_mode="gather")
    b = hip_search(queries, k, geo.lo, geo.hi, 16, bk, query_stride=1, score_mode="table")
    assert a.rounds == b.rounds > 0
    assert torch.equal(a.blocks, b.blocks) and torch.equal(a.valid, b.valid)


def test_auto_score_mode_prefers_the_table_on_cpu_for_longer_ranges():
    # K_b 256: one gather round scores 512 blocks; CPU uses the table up to 64 x 512 candidates
    assert choose_score_mode("auto", 4096, 256, "cpu") == "table"  # an 8K-token prompt
    assert choose_score_mode("auto", 64 * 512, 256, "cpu") == "table"
    assert choose_score_mode("auto", 64 * 512 + 1, 256, "cpu") == "gather"
    assert choose_score_mode("auto", 4096, 256, "cuda") == "gather"
    assert choose_score_mode("auto", 2048, 256, "cuda") == "table"
    assert choose_score_mode("gather", 10, 256, "cpu") == "gather"


def test_search_finds_planted_high_score_blocks_better_than_random():
    """Keys follow a smooth random walk (attention locality) with 12 planted regions of 6 blocks aligned to q."""
    torch.manual_seed(2)
    d, num_blocks, groups = 32, 1024, 64
    walk = torch.cumsum(torch.randn(num_blocks * 2, d) * 0.05, dim=0)
    keys = walk - walk.mean(0)
    q = torch.randn(d)
    q = q / q.norm()
    planted = (torch.randperm(num_blocks // 8)[:12] * 8).tolist()  # region starts, in blocks
    for start in planted:
        keys[start * 2 : (start + 6) * 2] += 4.0 * q
    k = keys.view(1, 1, -1, d)
    sel = hip_search(q.view(1, 1, 1, 1, d), k, torch.tensor([0]), torch.tensor([num_blocks]), groups, 2)
    assert sel.rounds == 4  # groups of 16 blocks halve down to 1
    chosen = set(sel.blocks.flatten().tolist())
    targets = {s + i for s in planted for i in range(6)}  # 72 blocks
    block_scores = (k[0, 0].view(num_blocks, 2, d) @ q).amax(-1)
    true_top = set(block_scores.topk(groups).indices.tolist())
    random_hits = [len(targets & set(torch.randperm(num_blocks)[:groups].tolist())) for _ in range(50)]
    assert len(targets & chosen) >= 40 and len(true_top & chosen) >= 40
    assert sum(any(s + i in chosen for i in range(6)) for s in planted) >= 10  # regions reached
    assert len(targets & chosen) > 4 * max(random_hits)


def test_budget_covering_sequence_reproduces_full(tiny):
    model, info, runner = tiny
    ids = torch.randint(0, 256, (1, 80))
    session = new_session("hip", info, mask_k=64, sink_tokens=4, window=16, dense_layers=0)  # budget 84
    got = stepwise_logits(session, runner, ids, chunk=16)
    torch.testing.assert_close(got, full_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert session.stats().extra["hip_searches"] == 0 and session.stats().attention_density == 1.0


def test_dense_layers_cover_every_layer_reproduces_full(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 200))
    session = new_session("hip", info, **{**SMALL, "dense_layers": info.num_layers})
    torch.testing.assert_close(stepwise_logits(session, runner, ids, 64), full_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert session.stats().extra["hip_searches"] == 0


def test_sparse_path_bounds_keys_per_query_and_keeps_full_cache(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 300))
    session = new_session("hip", info, **SMALL)
    logits = run_prefill(session, runner, ids)
    for _token in range(5):
        logits = session.decode(runner, int(logits.argmax()))
    stats = session.stats()
    budget = 32 + 4 + 16
    assert stats.extra["hip_budget_per_query"] == budget
    assert stats.extra["hip_max_keys_per_query"] == budget  # reached, never exceeded
    assert 0.0 < stats.attention_density < 0.5
    assert stats.tokens_kept == stats.tokens_seen == 305 and stats.kv_bytes_kept == stats.kv_bytes_full
    dense = full_logits(model, ids)[-1]
    sparse_first = run_prefill(new_session("hip", info, **SMALL), runner, ids)
    assert not torch.allclose(sparse_first, dense, atol=1e-3)  # the sparse path really ran


def test_chunked_prefill_aligned_to_query_blocks_equals_one_forward(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 260))
    chunked = stepwise_logits(new_session("hip", info, **SMALL), runner, ids, chunk=32)
    whole = stepwise_logits(new_session("hip", info, **SMALL), runner, ids, chunk=260)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)


def test_prefill_with_a_chunk_not_a_multiple_of_block_q_equals_one_pass(tiny_llama):
    """The runner's chunk (50) is rounded down to whole query blocks (48 = 3 x 16), so the prefill's
    query blocks fall where one pass puts them and the logits match one pass."""
    model, info, _ = tiny_llama
    ids = torch.randint(0, 256, (1, 260))
    odd = Runner(model, info, prefill_chunk_tokens=50)
    session = new_session("hip", info, **SMALL)
    assert session.prefill_chunk_tokens(odd) == 48
    chunked = run_prefill(session, odd, ids)
    whole = run_prefill(new_session("hip", info, **SMALL), Runner(model, info, prefill_chunk_tokens=260), ids)
    assert session.stats().extra["hip_searches"] > 0
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
    tiny = Runner(model, info, prefill_chunk_tokens=5)  # below one block: one block per forward
    assert new_session("hip", info, **SMALL).prefill_chunk_tokens(tiny) == 16


def test_decode_with_refresh_every_step_equals_a_search_per_query(tiny_llama):
    """r_m = 1 decode re-searches every step; that is a prefill whose query blocks hold one query."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 220))
    decode = new_session("hip", info, **SMALL, refresh_interval=1)
    per_step = stepwise_logits(decode, runner, ids, chunk=1)
    single = new_session("hip", info, **{**SMALL, "block_size_q": 1, "block_stride_q": 1})
    torch.testing.assert_close(per_step, stepwise_logits(single, runner, ids, chunk=220), atol=2e-5, rtol=1e-4)
    assert decode.stats().extra["hip_mask_reuses"] == 0


def test_decode_reuses_mask_and_refreshes_every_interval(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 120))
    session = new_session("hip", info, **SMALL, refresh_interval=4)
    logits = run_prefill(session, runner, ids)
    selections = []
    for _ in range(9):
        logits = session.decode(runner, int(logits.argmax()))
        selections.append(session.decode_masks[1].selection)
    assert [s is selections[0] for s in selections[:4]] == [True] * 4
    assert selections[4] is not selections[3] and selections[8] is not selections[7]
    extra = session.stats().extra
    assert extra["hip_mask_reuses"] == 2 * 6  # 2 layers x steps 2-4 and 6-8
    # a new prompt chunk invalidates the decode masks
    runner.forward(session, torch.randint(0, 256, (1, 5)))
    assert session.decode_masks == {}


def test_refresh_interval_longer_than_window_is_capped():
    params = HipParams(window=4, refresh_interval=8)
    assert params.effective_refresh == 4
    # at a refresh the candidate range reaches into the window far enough that no token falls out
    for lookahead in range(params.effective_refresh):
        geo = SparseGeometry.build(1, 500, 1, 2, 16, params.window, params.effective_refresh - 1, torch.device("cpu"))
        later_position = 499 + lookahead
        assert int(geo.hi[0]) * 2 >= later_position - params.window + 1


def test_decode_call_without_session_state_uses_single_query_geometry(tiny_llama):
    """A decode call on a sparse layer searches over one query block of one query."""
    model, info, runner = tiny_llama
    session = new_session("hip", info, **SMALL)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16)
    out = session.attention(AttentionCall(1, q, k, torch.randn(1, 2, 100, 16), None, 0.25))
    assert out.shape == (1, 1, 4, 16)
    sel = session.decode_masks[1].selection
    assert sel.blocks.shape == (1, 4, 1, 16) and sel.rounds > 0


def test_params_validation():
    with pytest.raises(ValueError):
        HipParams(mask_k=31, block_size_k=2)
    with pytest.raises(ValueError):
        HipParams(block_size_q=4, block_stride_q=8)
    assert HipParams().budget == 512 + 16 + 256


@pytest.mark.model
def test_embedded_model_passkey_at_2k(smollm):
    from kvmux.cli_args import default_presets_dir
    from kvmux.evals.quality.backends import EngineBackend
    from kvmux.evals.tasks import get_task
    from kvmux.evals.tasks.common import Renderer
    from kvmux.policies.presets import load_presets
    from kvmux.server.engine import Engine

    sample = get_task("passkey").make(Renderer(smollm.tokenizer), 2048, 10.0, 0, seed=42)  # an eval_hip/ cell
    out = EngineBackend(Engine(smollm, load_presets(default_presets_dir()))).generate(sample, {"preset": "hip"})
    assert sample.answers[0] in out.text
    assert out.kv["hip_max_keys_per_query"] <= 784 and out.kv["hip_searches"] > 0


GEOMETRIES = [(70, 300, 8, 2, 5, 20, 0), (1, 500, 1, 2, 16, 30, 7), (64, 64, 16, 2, 4, 8, 0), (5, 40, 4, 4, 0, 60, 3)]


@pytest.mark.parametrize("tq,tk,bq,bk,sinks,window,lookahead", GEOMETRIES)
def test_geometry_knows_its_largest_candidate_range_on_the_host(tq, tk, bq, bk, sinks, window, lookahead):
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead, torch.device("cpu"))
    assert geo.max_candidates == int((geo.hi - geo.lo).max())
