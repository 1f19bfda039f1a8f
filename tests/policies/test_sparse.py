"""The block-sparse layer: the block grid (exact against dense attention, eager vs flex_attention), the key-block
selection (PyTorch back-ends vs a dense token-mask oracle), and a grid run as a selection giving the grid's result."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies import sparse
from kvmux.policies.dense import causal_mask, repeat_kv, sdpa
from kvmux.policies.sparse import KeyBlockSelection, SparseGeometry
from kvmux.policies.sparse import attention as sparse_attention

BS = 16
SCALE = 16**-0.5


def qkv(tq: int, tk: int, hq: int = 4, hkv: int = 2, d: int = 16, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, tq, d, generator=gen)
    k = torch.randn(batch, hkv, tk, d, generator=gen)
    v = torch.randn(batch, hkv, tk, d, generator=gen)
    return q, k, v


def masked_reference(q, k, v, blocks, bs):
    """Dense attention with an element mask expanded from the normalised block selection."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    sel = sparse.normalize_blocks(blocks, b, hq, tq, tk, bs)
    first = sparse.first_query_block(tq, tk, bs)
    q_block = (torch.arange(tk - tq, tk) // bs) - first
    k_block = torch.arange(tk) // bs
    allowed = sel[:, :, q_block][:, :, :, k_block] & causal_mask(tq, tk, q.device)
    groups = hq // k.shape[1]
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=allowed, scale=SCALE)
    return out.transpose(1, 2)


def test_block_grid_is_absolute():
    # 37 queries that are the last of 133 keys: positions 96..132 -> absolute blocks 6, 7, 8
    assert sparse.first_query_block(37, 133, 16) == 6
    assert sparse.query_blocks(37, 133, 16) == 3
    causal = sparse.causal_blocks(37, 133, 16)
    assert causal.shape == (3, 9)
    assert causal.sum(-1).tolist() == [7, 8, 9]
    assert sparse.diagonal_blocks(37, 133, 16).nonzero().tolist() == [[0, 6], [1, 7], [2, 8]]


def test_normalize_drops_future_cells_and_adds_diagonal():
    blocks = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    blocks[0, 0, 0, 2] = True  # above the diagonal: ignored
    blocks[0, 0, 2, 0] = True
    sel = sparse.normalize_blocks(blocks, 1, 2, 48, 48, 16)
    expected = torch.eye(3, dtype=torch.bool)
    expected[2, 0] = True
    assert sel.shape == (1, 2, 3, 3)
    assert torch.equal(sel[0, 0], expected) and torch.equal(sel[0, 1], expected)
    with pytest.raises(ValueError):
        sparse.normalize_blocks(torch.ones(1, 1, 2, 3, dtype=torch.bool), 1, 1, 48, 48, 16)


def test_blocks_from_indices_and_density():
    indices = torch.tensor([[[0, 0], [0, 1], [2, 0]]])  # padding entries point at block 0
    counts = torch.tensor([[1, 2, 1]])
    blocks = sparse.blocks_from_indices(indices, counts, 3)
    assert blocks[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    # 4 kept of 6 causal cells (the diagonal is always kept)
    assert sparse.density(blocks[None], 48, 48, 16) == pytest.approx(4 / 6)
    assert sparse.density(torch.ones(1, 1, 3, 3, dtype=torch.bool), 48, 48, 16) == 1.0


@pytest.mark.parametrize("tq,tk", [(100, 100), (37, 133), (16, 64), (1, 50)])
def test_eager_all_blocks_equals_dense_causal(tq, tk):
    q, k, v = qkv(tq, tk)
    nqb, nkb = sparse.query_blocks(tq, tk, BS), sparse.num_blocks(tk, BS)
    everything = torch.ones(1, 1, nqb, nkb, dtype=torch.bool)
    got = sparse.block_sparse_attention(q, k, v, everything, BS, SCALE, backend="eager")
    torch.testing.assert_close(got, sdpa(q, k, v, None, SCALE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq,tk,batch", [(100, 100, 1), (37, 133, 2), (70, 70, 1)])
def test_eager_equals_masked_dense_reference(tq, tk, batch):
    q, k, v = qkv(tq, tk, batch=batch, seed=tq)
    nqb, nkb = sparse.query_blocks(tq, tk, BS), sparse.num_blocks(tk, BS)
    blocks = torch.rand(batch, 4, nqb, nkb, generator=torch.Generator().manual_seed(1)) < 0.3
    got = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="eager")
    torch.testing.assert_close(got, masked_reference(q, k, v, blocks, BS), atol=1e-5, rtol=1e-5)
    # dropping cells really changes the result (the selection is not silently ignored)
    assert not torch.allclose(got, sdpa(q, k, v, None, SCALE), atol=1e-3)


def test_eager_batches_rows_of_different_widths(monkeypatch):
    """Tiny batches (one row at a time) give the same result as one batch per width."""
    q, k, v = qkv(100, 100, seed=3)
    blocks = torch.rand(1, 4, 7, 7, generator=torch.Generator().manual_seed(2)) < 0.5
    monkeypatch.setitem(sparse.EAGER_CELLS_PER_BATCH, "cpu", 10**6)
    one_batch = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="eager")
    monkeypatch.setitem(sparse.EAGER_CELLS_PER_BATCH, "cpu", 1)
    row_by_row = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="eager")
    torch.testing.assert_close(one_batch, row_by_row, atol=1e-6, rtol=1e-6)


def test_eager_bf16_inputs_keep_fp32_scores():
    """bf16 in, bf16 out, and as close to the fp32 result as bf16 rounding of q, k, v allows."""
    q, k, v = qkv(100, 100, seed=5)
    blocks = torch.rand(1, 4, 7, 7, generator=torch.Generator().manual_seed(5)) < 0.5
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    got = sparse.block_sparse_attention(q16, k16, v16, blocks, BS, SCALE, backend="eager")
    assert got.dtype == torch.bfloat16
    expected = masked_reference(q16.float(), k16.float(), v16.float(), blocks, BS)
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("tq,tk", [(100, 100), (37, 133)])
def test_flex_agrees_with_eager(tq, tk):
    """GQA (4 query heads on 2 KV heads), ragged last block, and Tq < Tk with an unaligned start."""
    q, k, v = qkv(tq, tk, seed=tk)
    nqb, nkb = sparse.query_blocks(tq, tk, BS), sparse.num_blocks(tk, BS)
    blocks = torch.rand(1, 4, nqb, nkb, generator=torch.Generator().manual_seed(tq)) < 0.35
    eager = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="eager")
    flex = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="flex")
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-5)
    everything = torch.ones(1, 1, nqb, nkb, dtype=torch.bool)
    dense = sparse.block_sparse_attention(q, k, v, everything, BS, SCALE, backend="flex")
    torch.testing.assert_close(dense, sdpa(q, k, v, None, SCALE), atol=1e-5, rtol=1e-5)


def test_unknown_backend_rejected():
    q, k, v = qkv(32, 32)
    with pytest.raises(ValueError):
        sparse.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), BS, SCALE, backend="nope")


def test_auto_uses_the_eager_path_on_cpu(monkeypatch):
    def no_flex(*args, **kwargs):
        raise AssertionError("flex must not run on CPU under auto")

    monkeypatch.setattr(sparse_attention, "flex_block_attention", no_flex)
    q, k, v = (torch.randn(1, 2, 2 * BS, 8) for _ in range(3))
    everything = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    got = sparse.block_sparse_attention(q, k, v, everything, BS, SCALE, backend="auto")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def selection_oracle(q, k, v, sel: KeyBlockSelection, geo: SparseGeometry, scaling: float):
    """Dense attention with the token mask a selection means: sinks, selected blocks and window, causal."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    pos = torch.arange(tk - tq, tk)
    keys = torch.arange(tk)
    causal = keys[None, :] <= pos[:, None]
    fixed = causal & ((keys[None, :] < geo.sinks) | (keys[None, :] > pos[:, None] - geo.window))
    mask = fixed.expand(b, hq, tq, tk).clone()
    tokens = sel.blocks[..., None] * geo.block_k + torch.arange(geo.block_k)  # [B, Hq, nQB, K_b, b_k]
    tokens = torch.where(sel.valid[..., None], tokens, torch.full_like(tokens, -1)).flatten(-2)
    for row in range(tq):
        chosen = tokens[:, :, row // geo.block_q]
        hit = (keys.view(1, 1, 1, tk) == chosen[..., None]).any(-2)  # [B, Hq, Tk]
        mask[:, :, row] |= hit & causal[row]
    groups = hq // k.shape[1]
    scores = torch.matmul(q, repeat_kv(k, groups).transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(probs, repeat_kv(v, groups)).transpose(1, 2), mask.sum(-1)


def random_selection(geo: SparseGeometry, batch: int, heads: int, width: int, seed: int) -> KeyBlockSelection:
    """Up to `width` distinct ids per row from each query block's candidate range, some entries invalid."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.arange(int(geo.hi.max()) + width)
    in_range = (blocks >= geo.lo[:, None]) & (blocks < geo.hi[:, None])  # [nQB, blocks]
    scores = torch.rand(batch, heads, geo.num_blocks, len(blocks), generator=gen).masked_fill(~in_range, -1.0)
    top = scores.topk(width, dim=-1)
    valid = (top.values >= 0) & (torch.rand(top.values.shape, generator=gen) < 0.8)
    return KeyBlockSelection(blocks=top.indices, valid=valid)


@pytest.mark.parametrize(
    "tq,tk,bq,bk,sinks,window",
    [(70, 300, 8, 2, 5, 20), (64, 64, 16, 2, 4, 8), (33, 200, 16, 4, 0, 3), (1, 180, 1, 2, 16, 30)],
)
def test_selection_backends_match_the_token_mask_oracle(tq, tk, bq, bk, sinks, window):
    """Sinks, selected blocks (padding included) and window: each key once, causal."""
    q, k, v = qkv(tq, tk, hq=6, hkv=3, batch=2, seed=tk)
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead=0, device=q.device)
    sel = random_selection(geo, 2, 6, width=6, seed=tq)
    want, want_counts = selection_oracle(q, k, v, sel, geo, SCALE)
    for backend in ("reference", "fast"):
        out, counts = sparse.key_block_attention(q, k, v, sel, geo, SCALE, backend=backend)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(counts, want_counts)
    with pytest.raises(ValueError):
        sparse.key_block_attention(q, k, v, sel, geo, SCALE, backend="eager")


@pytest.mark.parametrize("tq,tk,bq", [(1, 180, 1), (40, 300, 8)])
def test_selection_reads_a_cache_view_in_place(tq, tk, bq, monkeypatch):
    """Keys and values that are views into a larger buffer (as a growable cache hands them) give the same
    result as contiguous copies, without the cache being padded or copied."""
    q, k, v = qkv(tq, tk, hq=6, hkv=3, batch=2, seed=7)
    buffers = [torch.zeros(2, 3, tk + 50, k.shape[-1]) for _ in range(2)]
    for buffer, x in zip(buffers, (k, v), strict=True):
        buffer[:, :, :tk] = x
    k_view, v_view = (buffer[:, :, :tk] for buffer in buffers)
    assert not k_view.is_contiguous() and sparse.gather.dense_rows(k_view)
    geo = SparseGeometry.build(tq, tk, bq, 2, 4, 20, lookahead=0, device=q.device)
    sel = random_selection(geo, 2, 6, width=6, seed=3)
    want, _ = sparse.key_block_attention(q, k, v, sel, geo, SCALE, backend="fast")
    copies = []
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **kw: copies.append("pad") or torch.constant_pad_nd(*a))
    got, _ = sparse.key_block_attention(q, k_view, v_view, sel, geo, SCALE, backend="fast")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if tq == 1:
        assert copies == []  # a decode row pads nothing
    strided = k.transpose(2, 3).contiguous().transpose(2, 3)  # token values not contiguous: copied first
    assert not sparse.gather.dense_rows(strided)
    again, _ = sparse.key_block_attention(q, strided, v, sel, geo, SCALE, backend="fast")
    torch.testing.assert_close(again, want, atol=1e-6, rtol=1e-5)


def grid_through_selection(q, k, v, blocks, bs, backend: str) -> torch.Tensor:
    """A grid converted to the selection form and run by one of the selection's back-ends."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    sel, geo = sparse.grid_as_selection(sparse.normalize_blocks(blocks, b, hq, tq, tk, bs), tq, tk, bs)
    front = geo.num_queries - tq
    padded = torch.nn.functional.pad(q, (0, 0, front, 0))
    if backend == "triton":
        kernels = sparse.triton_backend()
        out, _ = kernels.attention(
            padded, k, v, kernels.pack(sel), block_q=bs, block_k=bs, sinks=0, window=0, scaling=SCALE, block_n=32
        )
    else:
        out, _ = sparse.key_block_attention(padded, k, v, sel, geo, SCALE, backend=backend)
    return out[:, front:]


@pytest.mark.parametrize("tq,tk,batch", [(100, 100, 1), (37, 133, 2), (1, 50, 1)])
def test_a_grid_run_as_a_selection_gives_the_grid_result(tq, tk, batch):
    """The grid is the selection with b_q = b_k, no sinks, no window: same attention through every back-end."""
    q, k, v = qkv(tq, tk, batch=batch, seed=tq + tk)
    nqb, nkb = sparse.query_blocks(tq, tk, BS), sparse.num_blocks(tk, BS)
    blocks = torch.rand(batch, 4, nqb, nkb, generator=torch.Generator().manual_seed(tk)) < 0.35
    eager = sparse.block_sparse_attention(q, k, v, blocks, BS, SCALE, backend="eager")
    backends = ["reference", "fast"] + (["triton"] if sparse.triton_backend() is not None else [])
    for backend in backends:
        torch.testing.assert_close(grid_through_selection(q, k, v, blocks, BS, backend), eager, atol=1e-5, rtol=1e-4)
    # and back: the selection's ids are the grid's cells
    sel, _ = sparse.grid_as_selection(sparse.normalize_blocks(blocks, batch, 4, tq, tk, BS), tq, tk, BS)
    again = sparse.blocks_from_indices(sel.blocks, sel.valid.sum(-1), nkb)
    assert torch.equal(again, sparse.normalize_blocks(blocks, batch, 4, tq, tk, BS))
