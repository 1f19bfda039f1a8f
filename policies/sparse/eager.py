"""The block grid's eager back-end: exact attention over the selected cells, gathered and batched by row width.

For every (head, query block) row of a normalised grid (`grid.py`) it gathers the selected key
blocks and takes a plain masked softmax over them (two batched matmuls). Rows are grouped by their
exact number of cells, so no row is padded and only the last cell of a row - the diagonal - needs a
(triangular) mask. On CPU groups are cut into small batches (`EAGER_CELLS_PER_BATCH`) so the
gathered keys and the scores stay in a core's cache: with one large gather the kernel streams them
from memory and a second CPU thread buys little. Scores are fp32 for fp16/bf16 inputs. Works on
every device and dtype; it is the reference the tests compare the other back-ends with, and the
faster path on CPU (it beats both SDPA's fused CPU kernel over large gathers and inductor's
flex_attention kernel there; docs/results/flexprefill.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmux.policies.sparse.grid import query_blocks

# (query block, key block) cells computed per batch, per device type. On CPU 32 cells of 128 x 128
# keep a batch's gathered keys and scores in a core's cache (measured on a 2-core x86 CPU); elsewhere
# batches are large so kernel launches stay few (memory stays bounded).
EAGER_CELLS_PER_BATCH = {"cpu": 32}
DEFAULT_EAGER_CELLS_PER_BATCH = 2048


def pad_queries(query: torch.Tensor, num_keys: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Pad queries to the absolute block grid: [B, H, nqb*bs, D] and the number of front pad rows."""
    tq = query.shape[2]
    front = (num_keys - tq) % block_size
    nqb = query_blocks(tq, num_keys, block_size)
    back = nqb * block_size - tq - front
    return F.pad(query, (0, 0, front, back)), front


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sel: torch.Tensor, block_size: int, scaling: float
) -> torch.Tensor:
    """query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D], a normalised grid [B, Hq, nqb, nkb] -> [B, Tq, Hq, D]."""
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    groups = hq // hkv
    bs = block_size
    nqb, nkb = sel.shape[-2:]
    qp, front = pad_queries(query, tk, bs)
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
