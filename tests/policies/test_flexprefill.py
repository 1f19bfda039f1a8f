"""FlexPrefill: budgets, pattern test, block selection, equivalence to full, chunking, isolation."""

from __future__ import annotations

import math

import pytest
import torch

from kvmux.policies import flexprefill as fp
from kvmux.policies.base import AttentionCall
from kvmux.policies.sparse import causal_blocks, diagonal_blocks
from tests.policies.helpers import full_logits, new_session, run_prefill, stepwise_logits

SCALE = 16**-0.5


def brute_force_coverage(x: torch.Tensor, gamma: float) -> int:
    """Smallest k whose top-k mass exceeds gamma (all of x if none), by explicit enumeration."""
    values = sorted(x.tolist(), reverse=True)
    total = 0.0
    for k, value in enumerate(values, start=1):
        total += value
        if total > gamma:
            return k
    return len(values)


def test_coverage_count_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        x = torch.softmax(torch.randn(200, generator=gen, dtype=torch.float64) * (1 + trial % 5), dim=0)
        for gamma in (0.3, 0.9, 0.95):
            assert int(fp.coverage_count(x, gamma)) == brute_force_coverage(x, gamma)


def test_budget_uses_the_configured_block_size():
    x = torch.zeros(1, 256, dtype=torch.float64)
    x[0, :40] = 1 / 40  # 40 equal tokens hold all the mass: 36 stay <= 0.91, +1
    assert int(fp.coverage_count(x, 0.91)) == 37
    assert fp.budget_blocks(x, 0.91, 16, lo=1, hi=16).tolist() == [37 // 16 + 1]  # 3, not 37 // 128 + 1
    assert fp.budget_blocks(x, 0.91, 16, lo=5, hi=16).tolist() == [5]  # min budget
    assert fp.budget_blocks(x, 0.91, 4, lo=1, hi=6).tolist() == [6]  # max budget


def test_diagonal_sums_match_loops():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 5, 12, generator=gen)
    got = fp.diagonal_sums(probs, 12)
    want = torch.zeros(2, 12)
    for i in range(5):
        pos = 12 - 5 + i
        for j in range(pos + 1):
            want[:, pos - j] += probs[:, i, j]
    torch.testing.assert_close(got, want)


def test_sqrt_js_distance():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    d = fp.sqrt_js_distance(p, q)
    assert d[0].item() == pytest.approx(0.0, abs=1e-7)
    assert d[1].item() == pytest.approx(math.sqrt(math.log(2)), rel=1e-6)  # disjoint: the maximum
    assert not torch.isnan(d).any()  # zero probabilities do not produce NaN


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_js_test_separates_query_aware_and_vertical_slash_heads():
    """Head 0: one query vector repeated and keys constant within each 16-token block, so the
    pooled estimate (mean query x block-mean keys) is nearly the true block distribution: small
    distance, query-aware. Head 1: every query matches only its own key (q = 3k), which the mean
    query cannot see: the estimate is nearly uniform, the truth sits on the diagonal block."""
    tk, d = 160, 16
    query, key = torch.empty(2, tk, d), torch.empty(2, tk, d)
    query[0] = gaussian(d, seed=1)
    key[0] = gaussian(tk // 16, d, seed=2).repeat_interleave(16, 0) * 0.3
    key[1] = gaussian(tk, d, seed=3)
    query[1] = 3 * key[1]
    params = fp.FlexPrefillParams(block_size=16, gamma=0.9, tau=0.1, min_budget=32)
    sel = fp.select_blocks(query, key, SCALE, params)
    assert sel.jsd[0] < 0.1 < sel.jsd[1]
    assert sel.query_aware.tolist() == [True, False]
    assert sel.n_vertical[0] == sel.n_slash[0] == 2  # query-aware heads drop to the minimum budget
    tau0 = fp.select_blocks(query, key, SCALE, params.model_copy(update={"tau": 0.0}))
    assert not tau0.query_aware.any()  # tau 0 (the reference's default) never picks query-aware


def test_vertical_and_slash_cells_follow_the_probe():
    """Head 0 attends to key block 3 from everywhere (a vertical line); head 1 attends to the key
    40 positions back (a slash at block offset 40 // 16 = 2). Both are kept on every row."""
    tk, d = 160, 64
    scale = d**-0.5
    u = gaussian(d, seed=4)
    u = 4 * u / u.norm()
    query, key = torch.empty(2, tk, d), torch.empty(2, tk, d)
    query[0] = 3 * u + 0.1 * gaussian(tk, d, seed=5)
    key[0] = 0.1 * gaussian(tk, d, seed=6)
    key[0, 48:64] = 3 * u
    key[1] = gaussian(tk, d, seed=7)
    query[1] = 0.1 * gaussian(tk, d, seed=8)
    query[1, 40:] = 2 * key[1, :-40]
    params = fp.FlexPrefillParams(block_size=16, gamma=0.9, tau=0.0, min_budget=32)
    sel = fp.select_blocks(query, key, scale, params)
    assert sel.n_vertical[0] == 2 and sel.n_slash[1] == 2  # block 0 / main diagonal + the hot one
    assert sel.blocks[0, 3:, 3].all() and not sel.blocks[0, 5:, 4].any()
    rows = torch.arange(2, 10)
    assert sel.blocks[1, rows, rows - 2].all()
    rows = torch.arange(4, 9)  # offset 3, away from the kept columns (block 0 and the block of keys 104..119)
    assert not sel.blocks[1, rows, rows - 3].any()


def test_block_zero_and_diagonal_always_kept():
    gen = torch.Generator().manual_seed(3)
    query, key = torch.randn(4, 200, 16, generator=gen), torch.randn(2, 200, 16, generator=gen)
    for tau in (0.0, 1.0):  # all vertical-slash, all query-aware
        params = fp.FlexPrefillParams(block_size=16, gamma=0.01, tau=tau, min_budget=0)
        sel = fp.select_blocks(query, key, SCALE, params)
        assert sel.blocks[:, :, 0].all()
        assert sel.blocks[:, diagonal_blocks(200, 200, 16)].all()
        assert (sel.n_vertical == 1).all() and (sel.n_slash == 1).all()
        # a gamma this small keeps little else: far from dense
        assert sel.blocks.sum() < 0.5 * causal_blocks(200, 200, 16).sum() * 4


def test_query_aware_cells_follow_the_block_map():
    """One query block, two key blocks: the map's mass goes to block 1 first, and gamma bounds it."""
    query = torch.ones(1, 32, 4)  # (query block 1 of a 32-token prompt: its last 16 queries)
    key_means = torch.tensor([[[0.0] * 4, [1.0] * 4]])
    cells = fp.query_aware_cells(query[:, 16:], key_means, 32, 0.5, 16, gamma=0.9)
    assert cells.tolist() == [[[False, True]]]  # softmax([0, 2]) = [0.12, 0.88]: only 0.88 fits in 0.9
    cells = fp.query_aware_cells(query[:, 16:], key_means, 32, 0.5, 16, gamma=0.8)
    assert cells.tolist() == [[[False, False]]]  # a global rule: even the top cell may not fit


def test_full_budget_reproduces_full_logits(tiny):
    model, info, runner = tiny
    ids = torch.randint(0, 256, (1, 150))
    session = new_session("flexprefill", info, block_size=16, gamma=1.0, tau=0.0, min_budget=0, backend="eager")
    got = run_prefill(session, runner, ids)
    torch.testing.assert_close(got, full_logits(model, ids)[-1], atol=2e-5, rtol=1e-4)
    extra = session.stats().extra
    assert extra["sparse_calls"] == info.num_layers and extra["dense_calls"] == 0
    assert session.stats().attention_density == 1.0


def test_flex_backend_matches_eager_on_a_tiny_model(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 150))
    outs = []
    for backend in ("eager", "flex"):
        session = new_session("flexprefill", info, block_size=16, min_budget=16, max_budget=32, backend=backend)
        outs.append(run_prefill(session, runner, ids))
        assert session.stats().attention_density < 1.0
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_one_pass_by_default_and_chunks_on_request(tiny_llama):
    model, info, runner = tiny_llama  # the runner's own chunk is 64 tokens
    ids = torch.randint(0, 256, (1, 150))
    one = new_session("flexprefill", info, block_size=16, gamma=0.8, min_budget=16, backend="eager")
    assert one.prefill_chunk_tokens(runner) >= 150
    run_prefill(one, runner, ids)
    assert one.stats().extra["sparse_calls"] == info.num_layers  # one forward
    # chunked: every chunk selects over all keys so far; with a covering budget it is exact
    chunked = new_session(
        "flexprefill", info, block_size=16, gamma=1.0, tau=0.0, min_budget=0, prefill_chunk=40, backend="eager"
    )
    got = stepwise_logits(chunked, runner, ids, chunk=chunked.prefill_chunk_tokens(runner))
    torch.testing.assert_close(got, full_logits(model, ids), atol=2e-5, rtol=1e-4)
    # 4 chunks (40, 80, 120, 150 keys), each over more than 2 blocks: all four went through the sparse path
    assert chunked.stats().extra["sparse_calls"] == 4 * info.num_layers


def test_chunk_selection_uses_the_absolute_grid():
    """A 37-query chunk at the end of 133 keys: rows are absolute blocks 6..8; sink and diagonal kept."""
    gen = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 37, 16, generator=gen), torch.randn(1, 133, 16, generator=gen)
    params = fp.FlexPrefillParams(block_size=16, gamma=0.01, tau=0.0, min_budget=0)
    sel = fp.select_blocks(query, key, SCALE, params)
    assert sel.blocks.shape == (2, 3, 9)
    assert sel.blocks[:, :, 0].all()
    assert sel.blocks[:, diagonal_blocks(37, 133, 16)].all()


def test_decode_and_short_prompts_are_dense(tiny_llama):
    model, info, runner = tiny_llama
    session = new_session("flexprefill", info, block_size=16, min_budget=64)  # dense up to 4 blocks
    ids = torch.randint(0, 256, (1, 60))
    got = stepwise_logits(session, runner, ids, chunk=60)
    torch.testing.assert_close(got, full_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert session.stats().attention_density == 1.0
    assert session.stats().extra == {"sparse_calls": 0, "dense_calls": info.num_layers}
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 300, 16, generator=gen)
    call = AttentionCall(layer_idx=0, query=q, key=k, value=k.clone(), mask=None, scaling=SCALE)
    out = session.attention(call)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert session.stats().extra["dense_calls"] == info.num_layers  # decode is not a prefill call


def test_one_block_after_cached_keys_is_dense(tiny_llama):
    """A question of at most one query block after a cached prefix: dense, exactly full attention."""
    model, info, runner = tiny_llama
    session = new_session("flexprefill", info, block_size=16, gamma=0.5, min_budget=0, backend="eager")
    ids = torch.randint(0, 256, (1, 212))
    run_prefill(session, runner, ids[:, :200])
    sparse_before = session.stats().extra["sparse_calls"]
    got = runner.forward(session, ids[:, 200:], all_logits=True)[0]
    assert session.stats().extra["sparse_calls"] == sparse_before
    assert session.stats().extra["dense_calls"] == info.num_layers
    assert torch.isfinite(got).all()
