"""Block-sparse causal attention: one meaning, two back-ends (an exact gather reference and flex_attention).

Sparse-prefill policies (FlexPrefill, arXiv 2502.20766; HiP, arXiv 2406.09827) choose, per query
head, which (query block, key block) cells of the causal attention map to compute. This module
turns such a choice into attention output; the policies only decide the cells.

The block grid is **absolute**: key block c holds key positions [c*bs, (c+1)*bs); query block r
holds the queries whose absolute position (Tk - Tq + i, queries being the last Tq of the Tk
keys) lies in [r*bs, (r+1)*bs). With Tq < Tk (chunked prefill) the first query block may be
partial; it is row 0 of the selection, absolute block `first_query_block(Tq, Tk, bs)`.

A selection is a bool tensor `blocks` [B|1, H|1, nqb, nkb] (H = query heads; 1 broadcasts),
True = compute the cell. Inside the cells the attention is exact: softmax over the union of the
selected keys, causal (query at position p sees keys <= p), so diagonal cells are triangular.
Cells above the diagonal are ignored and the diagonal cell of every row is always computed, so
every query sees at least itself. Selecting every causal cell gives dense causal attention.

Back-ends (`backend=`):
- `"eager"`: gathers the selected key blocks of each (head, query block) row and takes a plain
  masked softmax over them (two batched matmuls). Rows are grouped by their exact number of
  cells, so no row is padded and only the last cell of a row - the diagonal - needs a
  (triangular) mask; on CPU groups are cut into small batches (~32 cells) so the gathered keys and
  the scores stay in cache: with one large gather the kernel streams them from memory and a second
  CPU thread buys little. Scores are fp32 for fp16/bf16 inputs. Works on every device and dtype;
  it is the reference the tests compare against, and on CPU the faster path (it beats both
  SDPA's fused CPU kernel over large gathers and inductor's flex kernel there).
- `"flex"`: `torch.nn.attention.flex_attention` with a `BlockMask` built from the selection
  (off-diagonal cells as full blocks, diagonal cells masked by a causal `mask_mod`), compiled
  with `torch.compile(dynamic=True)`: inductor C++ on CPU, Triton on CUDA. Queries are padded in
  front to the block grid, lengths to block multiples, and the keys by one spare block (so the
  padded key length always exceeds the query length), so one compiled graph serves every
  length, one-pass or chunked. A shape bucket is (device, dtype, batch 1 or not, heads, head
  dim, block size). Compiling takes 10-40 s on an idle CPU the first time in a process (the
  inductor cache on disk makes later processes faster), seconds on CUDA.
- `"auto"`: eager on CPU; elsewhere flex where it compiles, else eager. If compiling fails, the
  failure is remembered for the device type and eager is used from then on.

The compiled function and the "flex is unusable on this device" flag are process-wide caches
of compiled code, not request state.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["auto", "eager", "flex"]

# (query block, key block) cells computed per batch by the eager back-end, per device type. On CPU
# 32 cells of 128 x 128 keep a batch's gathered keys and scores in a core's cache (measured on a
# 2-core x86 CPU); elsewhere batches are large so kernel launches stay few (memory stays bounded).
EAGER_CELLS_PER_BATCH = {"cpu": 32}
DEFAULT_EAGER_CELLS_PER_BATCH = 2048


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def first_query_block(num_queries: int, num_keys: int, block_size: int) -> int:
    """Absolute block index of the first query (queries are the last `num_queries` of `num_keys`)."""
    return (num_keys - num_queries) // block_size


def query_blocks(num_queries: int, num_keys: int, block_size: int) -> int:
    """Number of (absolute) query blocks the queries touch."""
    return num_blocks(num_keys, block_size) - first_query_block(num_queries, num_keys, block_size)


def causal_blocks(num_queries: int, num_keys: int, block_size: int, device=None) -> torch.Tensor:
    """bool [nqb, nkb]: every cell on or below the block diagonal."""
    first = first_query_block(num_queries, num_keys, block_size)
    rows = torch.arange(first, num_blocks(num_keys, block_size), device=device)
    cols = torch.arange(num_blocks(num_keys, block_size), device=device)
    return cols[None, :] <= rows[:, None]


def diagonal_blocks(num_queries: int, num_keys: int, block_size: int, device=None) -> torch.Tensor:
    """bool [nqb, nkb]: the diagonal cell of every query block."""
    first = first_query_block(num_queries, num_keys, block_size)
    rows = torch.arange(first, num_blocks(num_keys, block_size), device=device)
    cols = torch.arange(num_blocks(num_keys, block_size), device=device)
    return cols[None, :] == rows[:, None]


def blocks_from_indices(indices: torch.Tensor, counts: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Padded index table -> bool selection.

    indices: long [..., nqb, S] key-block ids; counts: [..., nqb], the first `counts` ids of each
    row are valid (the rest is padding). Returns bool [..., nqb, num_key_blocks].
    """
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    hits = torch.zeros(*indices.shape[:-1], num_key_blocks, dtype=torch.int32, device=indices.device)
    safe = torch.where(valid, indices, torch.zeros_like(indices)).long()
    return hits.scatter_add_(-1, safe, valid.to(torch.int32)) > 0


def normalize_blocks(
    blocks: torch.Tensor, batch: int, heads: int, num_queries: int, num_keys: int, block_size: int
) -> torch.Tensor:
    """Expand to [B, H, nqb, nkb], drop cells above the diagonal, add the diagonal."""
    nqb, nkb = query_blocks(num_queries, num_keys, block_size), num_blocks(num_keys, block_size)
    if blocks.dim() != 4 or tuple(blocks.shape[-2:]) != (nqb, nkb):
        raise ValueError(f"blocks must be [B|1, H|1, {nqb}, {nkb}], got {tuple(blocks.shape)}")
    causal = causal_blocks(num_queries, num_keys, block_size, blocks.device)
    diag = diagonal_blocks(num_queries, num_keys, block_size, blocks.device)
    return ((blocks.bool() & causal) | diag).expand(batch, heads, nqb, nkb)


def density(blocks: torch.Tensor, num_queries: int, num_keys: int, block_size: int) -> float:
    """Kept causal cells / all causal cells (after normalisation), averaged over batch and heads."""
    b, h = blocks.shape[0], blocks.shape[1]
    sel = normalize_blocks(blocks, b, h, num_queries, num_keys, block_size)
    total = causal_blocks(num_queries, num_keys, block_size).sum().item() * b * h
    return sel.sum().item() / total


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: torch.Tensor,
    block_size: int,
    scaling: float,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Exact causal attention restricted to the selected blocks.

    query [B, Hq, Tq, D] (the last Tq positions), key/value [B, Hkv, Tk, D] (Hq % Hkv == 0, not
    repeated), blocks bool [B|1, Hq|1, nqb, nkb] on the absolute block grid (see module doc).
    Returns [B, Tq, Hq, D], the layout of `dense.sdpa`.
    """
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than keys ({tk})")
    sel = normalize_blocks(blocks.to(query.device), b, hq, tq, tk, block_size)
    if backend == "auto":
        device_type = query.device.type
        backend = "flex" if device_type != "cpu" and _flex_state(device_type).usable else "eager"
    if backend == "flex":
        try:
            return _flex_attention(query, key, value, sel, block_size, scaling)
        except Exception as err:  # compile or kernel failure: fall back, remember for the device
            state = _flex_state(query.device.type)
            if not state.usable:
                raise
            state.usable = False
            log.warning("flex_attention unusable on %s (%s); using the eager block-sparse path", query.device, err)
    elif backend != "eager":
        raise ValueError(f"unknown backend {backend!r}")
    return _eager_attention(query, key, value, sel, block_size, scaling)


# -- eager reference -------------------------------------------------------------------------------


def _pad_queries(query: torch.Tensor, num_keys: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Pad queries to the absolute block grid: [B, H, nqb*bs, D] and the number of front pad rows."""
    tq = query.shape[2]
    front = (num_keys - tq) % block_size
    nqb = query_blocks(tq, num_keys, block_size)
    back = nqb * block_size - tq - front
    return F.pad(query, (0, 0, front, back)), front


def _eager_attention(query, key, value, sel, block_size: int, scaling: float) -> torch.Tensor:
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups = hq // hkv
    bs = block_size
    nqb, nkb = sel.shape[-2:]
    qp, front = _pad_queries(query, tk, bs)
    # one row of the flat tables per (batch, kv head, key block): gathers are plain row copies
    kb = F.pad(key, (0, 0, 0, nkb * bs - tk)).reshape(b * hkv * nkb, bs * d)
    vb = F.pad(value, (0, 0, 0, nkb * bs - tk)).reshape(b * hkv * nkb, bs * d)
    # scores in fp32 whatever the input dtype (the softmax of bf16 scores loses the tail)
    work_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    rows_total = b * hq * nqb
    flat = sel.reshape(rows_total, nkb)
    counts = flat.sum(-1)
    order = torch.argsort(counts, stable=True)
    widths, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    # the flat-table row of every selected cell, ascending within a row (the diagonal cell last)
    all_rows = torch.arange(rows_total, device=query.device)
    kv_base = ((all_rows // (hq * nqb)) * hkv + (all_rows // nqb) % hq // groups) * nkb
    cells = (kv_base[:, None] + torch.argsort((~flat).to(torch.int8), dim=-1, stable=True))[order]
    # rows sorted by width once: every batch below is a contiguous slice of the queries and of the
    # output (no per-batch query gather or output scatter); queries converted and scaled once
    q_sorted = (qp.to(work_dtype) * scaling).reshape(rows_total, bs, d)[order]
    out_sorted = torch.empty(rows_total, bs, d, dtype=work_dtype, device=query.device)
    above_diagonal = torch.ones(bs, bs, dtype=torch.bool, device=query.device).triu(1)
    cells_per_batch = EAGER_CELLS_PER_BATCH.get(query.device.type, DEFAULT_EAGER_CELLS_PER_BATCH)
    start = 0
    for width, size in zip(widths.tolist(), sizes.tolist(), strict=True):
        # rows of equal width need no padding; on CPU a batch is small enough for its gathered keys
        # and scores to stay in cache (one big gather streams them from memory instead)
        rows_per_batch = max(1, cells_per_batch // width)
        for first in range(start, start + size, rows_per_batch):
            last = min(first + rows_per_batch, start + size)
            index = cells[first:last, :width].reshape(-1)
            k_rows = kb.index_select(0, index).view(last - first, width * bs, d).to(work_dtype)
            v_rows = vb.index_select(0, index).view(last - first, width * bs, d).to(work_dtype)
            scores = torch.bmm(q_sorted[first:last], k_rows.transpose(1, 2))
            scores[:, :, -bs:].masked_fill_(above_diagonal, float("-inf"))
            torch.softmax(scores, dim=-1, out=scores)
            torch.bmm(scores, v_rows, out=out_sorted[first:last])
        start += size
    out = torch.empty(rows_total, bs, d, dtype=query.dtype, device=query.device)
    out.index_copy_(0, order, out_sorted.to(query.dtype))
    out = out.view(b, hq, nqb * bs, d)[:, :, front : front + tq]
    return out.transpose(1, 2).contiguous()


# -- flex_attention ----------------------------------------------------------------------------


class _FlexState:
    """Whether the compiled flex path works on a device type (set False after a failure)."""

    def __init__(self) -> None:
        self.usable = True


@functools.cache
def _flex_state(device_type: str) -> _FlexState:
    return _FlexState()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(sel: torch.Tensor, num_queries: int, num_keys: int, block_size: int):
    """BlockMask for a normalised selection [B, H, nqb, nkb'] over queries padded to the grid.

    nkb' may exceed the key blocks of `num_keys` (spare, unselected blocks); the grid is nkb' wide.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = block_size
    nqb, nkb = sel.shape[-2:]
    first = first_query_block(num_queries, num_keys, bs)
    diag = F.pad(diagonal_blocks(num_queries, num_keys, bs, sel.device), (0, nkb - num_blocks(num_keys, bs)))
    full = sel & ~diag
    full_counts = full.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    shape = sel.shape[:2]
    diag_idx = torch.zeros(nqb, nkb, dtype=torch.int32, device=sel.device)
    diag_idx[:, 0] = first + torch.arange(nqb, device=sel.device, dtype=torch.int32)
    diag_counts = torch.ones(*shape, nqb, dtype=torch.int32, device=sel.device)
    q_base = torch.tensor(first * bs, device=sel.device)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + q_base

    return BlockMask.from_kv_blocks(
        diag_counts,
        diag_idx.expand(*shape, nqb, nkb).contiguous(),
        full_counts,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=causal,
        seq_lengths=(nqb * bs, nkb * bs),
    )


def _flex_attention(query, key, value, sel, block_size: int, scaling: float) -> torch.Tensor:
    tq, tk = query.shape[2], key.shape[2]
    nkb = sel.shape[-1]
    qp, front = _pad_queries(query, tk, block_size)
    # one spare (never selected) key block keeps the padded key length above the query length, so
    # Tq == Tk and Tq < Tk trace to the same graph (no duck-sized "equal lengths" specialisation)
    pad_k = (nkb + 1) * block_size - tk
    kp = F.pad(key, (0, 0, 0, pad_k))
    vp = F.pad(value, (0, 0, 0, pad_k))
    mask = flex_block_mask(F.pad(sel, (0, 1)), tq, tk, block_size)
    enable_gqa = query.shape[1] != key.shape[1]
    # a few graph variants per model (Tq == Tk or not, dtype); never fall back to uncompiled flex
    with torch._dynamo.config.patch(recompile_limit=64):
        out = _compiled_flex()(qp, kp, vp, block_mask=mask, scale=scaling, enable_gqa=enable_gqa)
    return out[:, :, front : front + tq].transpose(1, 2).contiguous()


def block_sparse_flops(sel: torch.Tensor, block_size: int, head_dim: int) -> int:
    """Multiply-adds of QK^T and PV over the selected cells (for reports)."""
    return int(sel.sum().item()) * 2 * block_size * block_size * head_dim


__all__ = [
    "block_sparse_attention",
    "blocks_from_indices",
    "causal_blocks",
    "density",
    "diagonal_blocks",
    "first_query_block",
    "num_blocks",
    "query_blocks",
]
