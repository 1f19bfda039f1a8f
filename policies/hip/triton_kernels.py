"""Triton kernels for HiP (arXiv 2406.09827): the branch-and-prune search and the sparse attention.

The paper's speed comes from fused kernels: one program per (head, query block) keeps the search
rounds on chip, and a block-sparse flash kernel attends sinks, selected blocks and window in one
online softmax. These two kernels do the same for CUDA. They compute what `search.hip_search`
and `attention.sparse_attention` compute; the tests run both kernels through Triton's interpreter on CPU
and compare them with the PyTorch paths and a dense-mask oracle. For fp32 inputs the selection
is the same. For bf16, branch scores accumulate in fp32 here, while the PyTorch search rounds them
to bf16, so near-ties may break differently.

- `search`: per (batch, query head, query block) one program. It splits the candidate key blocks
  [lo, hi) into K_b groups, then for each round scores the two halves of every group by their
  center block (max of q . k over the block's sampled queries and the b_k keys, fp32, unscaled),
  sorts the 2 K_b scores on chip (scores packed with the candidate index into one int64 key, so
  the order is total) and keeps the best K_b. Candidates and scores go through a small scratch
  buffer in global memory because Triton has no register gather; the candidates are scored
  `SEARCH_SCORE_CHUNK` at a time, so only a chunk's key tile occupies registers (the chunk
  changes registers and speed, never the selection). K_b must be a power of two in [16, 2^15]
  (the paper's 256 is); other values use the PyTorch search. `scripts/compile_hip_kernels.py`
  compiles every launch for sm_80/sm_90 without a GPU and reports registers and spills.
- `attention`: per (batch, query head, query block) one program: an online softmax over the
  sinks, the selected blocks (keys gathered by index inside the kernel, nothing materialised) and
  the window, with the same masks as `attention.segments` (each key once, causal). It folds the keys
  every query row attended into the session's running sum and max (atomics, for the stats) and
  can return the per-row counts.

Decode (one query) runs the same kernels with b_q = 1; the 16-row tiles `tl.dot` needs are masked.
Dots accumulate in fp32; bf16/fp16 operands use the tensor cores on CUDA. Under the interpreter
operands are upcast to fp32 first, because the interpreter's own bf16 dot gives wrong results.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvmux.policies.hip.types import KeyBlockSelection, SparseGeometry

MIN_DOT = 16  # smallest tile side tl.dot accepts
SEARCH_NUM_WARPS = 8
# candidates scored per step, by launch: prefill (thousands of programs) is bound by occupancy, so a
# 64 x D key tile keeps it at 128 registers a thread without spills (bf16, D 128; scoring all 512
# at once takes 255 and spills); decode (one program per head, a few dozen) is bound by latency, so
# it scores in fewer, larger steps. fp32 tiles take twice the shared memory: 256 x 128 of them need
# 276 KB, more than any GPU gives one program, so fp32 stays at 64.
SEARCH_SCORE_CHUNK = 64
SEARCH_SCORE_CHUNK_DECODE = 256
ATTENTION_NUM_WARPS = 4
# keys per online-softmax step: 64 for 16-bit inputs; 32 for fp32, whose 64-key steps need 155 KB of
# shared memory at D 128 (more than sm_86/sm_89 give) and spill, while 32-key steps need 86 KB
ATTENTION_BLOCK_N = 64
ATTENTION_BLOCK_N_FP32 = 32


def exact_dots(dtype: torch.dtype) -> bool:
    """fp32 dots: for fp32 inputs, and always under Triton's CPU interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def usable_groups(num_groups: int) -> bool:
    """Whether the Triton search handles K_b groups (a power of two, at least one dot tile, 2 K_b <= 2^16)."""
    return MIN_DOT <= num_groups <= 1 << 15 and num_groups & (num_groups - 1) == 0


def search_constants(
    head_dim: int, block_q: int, query_stride: int, num_groups: int, block_k: int, dtype, score_chunk: int | None = None
) -> dict:
    """The search kernel's compile-time constants (what a launch specialises on).

    score_chunk: candidates scored per step (a power of two, at least 16, at most 2 K_b); default
    `SEARCH_SCORE_CHUNK`, or `SEARCH_SCORE_CHUNK_DECODE` for one-query blocks of 16-bit inputs,
    capped at 2 K_b.
    """
    sampled = -(-block_q // query_stride)
    if score_chunk is None:
        large = block_q == 1 and not exact_dots(dtype)
        score_chunk = SEARCH_SCORE_CHUNK_DECODE if large else SEARCH_SCORE_CHUNK
    chunk = min(score_chunk, 2 * num_groups)
    if chunk < MIN_DOT or chunk & (chunk - 1):
        raise ValueError(f"score_chunk must be a power of two >= {MIN_DOT}, got {chunk}")
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(MIN_DOT, triton.next_power_of_2(head_dim)),
        "BLOCK_S": max(MIN_DOT, triton.next_power_of_2(sampled)),
        "NUM_GROUPS": num_groups,
        "BLOCK_K": block_k,
        "SCORE_CHUNK": chunk,
        "IEEE": exact_dots(dtype),
    }


def attention_constants(
    head_dim: int, block_q: int, block_k: int, dtype, block_n: int | None, row_counts: bool, has_totals: bool
) -> dict:
    """The attention kernel's compile-time constants (what a launch specialises on).

    block_n: keys per step; default `ATTENTION_BLOCK_N`, `ATTENTION_BLOCK_N_FP32` for fp32 dots.
    """
    if block_n is None:
        block_n = ATTENTION_BLOCK_N_FP32 if exact_dots(dtype) else ATTENTION_BLOCK_N
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(MIN_DOT, triton.next_power_of_2(head_dim)),
        "BLOCK_M": max(MIN_DOT, triton.next_power_of_2(block_q)),
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "IEEE": exact_dots(dtype),
        "ROW_COUNTS": row_counts,
        "HAS_TOTALS": has_totals,
    }


def search_rounds(max_candidates: int, num_groups: int) -> int:
    """Rounds until every group holds at most one block: ceil(log2(largest initial group))."""
    largest = -(-max_candidates // num_groups)
    return math.ceil(math.log2(largest)) if largest > 1 else 0


@triton.jit
def _program(num_heads, groups, num_qblocks):
    """Grid (query block, batch x query head) -> (query block, bh, batch, head, KV head, flat program id)."""
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    head = bh % num_heads
    return qblock, bh, bh // num_heads, head, head // groups, bh * num_qblocks + qblock


@triton.jit
def _sortable(x):
    """fp32 -> int32 whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE: fp32 operands and exact products (no TF32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _block_scores(
    qs, s_ok, k_base, stride_kt, rep, empty, num_keys, d_idx, d_ok, BLOCK_K: tl.constexpr, IEEE: tl.constexpr
):
    """Max of q . k over the sampled queries and the BLOCK_K keys of each representative block."""
    best = tl.full(rep.shape, float("-inf"), tl.float32)
    for offset in tl.static_range(BLOCK_K):
        token = tl.minimum(rep * BLOCK_K + offset, num_keys - 1)
        keys = tl.load(k_base + token[:, None] * stride_kt + d_idx[None, :], mask=d_ok[None, :], other=0.0)
        scores = _dot(qs, tl.trans(keys), IEEE)
        scores = tl.where(s_ok[:, None], scores, float("-inf"))
        best = tl.maximum(best, tl.max(scores, axis=0))
    return tl.where(empty, float("-inf"), best)


@triton.jit
def _search_kernel(
    Q, K, LO, HI, SCRATCH, OUT,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    num_heads, groups, num_queries, num_keys, num_qblocks, block_q, query_stride, rounds,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_GROUPS: tl.constexpr, BLOCK_K: tl.constexpr, SCORE_CHUNK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    qblock, bh, batch, head, kv_head, program = _program(num_heads, groups, num_qblocks)

    d_idx = tl.arange(0, BLOCK_D)
    d_ok = d_idx < HEAD_DIM
    s_idx = tl.arange(0, BLOCK_S)
    s_ok = s_idx < tl.cdiv(block_q, query_stride)
    # the last query block is padded by repeating the last query (as the PyTorch search does)
    rows = tl.minimum(qblock * block_q + s_idx * query_stride, num_queries - 1)
    q_ptr = Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qt + d_idx[None, :]
    qs = tl.load(q_ptr, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh

    lo = tl.load(LO + qblock)
    hi = tl.load(HI + qblock)
    count = tl.maximum(hi - lo, 0)
    last = tl.maximum(hi - 1, 0)
    g = tl.arange(0, NUM_GROUPS)
    starts = lo + (g * count) // NUM_GROUPS
    sizes = lo + ((g + 1) * count) // NUM_GROUPS - starts

    # scratch per program: candidate starts [0, 2K_b), sizes [2K_b, 4K_b), sortable scores [4K_b, 6K_b);
    # candidate c < K_b is the left half of group c, c >= K_b the right half of group c - K_b
    scratch = SCRATCH + program * (6 * NUM_GROUPS)
    cand = tl.arange(0, 2 * NUM_GROUPS)
    for _ in range(rounds):
        left = sizes // 2
        tl.store(scratch + g, starts)
        tl.store(scratch + NUM_GROUPS + g, starts + left)
        tl.store(scratch + 2 * NUM_GROUPS + g, left)
        tl.store(scratch + 3 * NUM_GROUPS + g, sizes - left)
        tl.debug_barrier()
        # score the candidates SCORE_CHUNK at a time: a chunk's key tile is what lives in registers
        for first in range(0, 2 * NUM_GROUPS, SCORE_CHUNK):
            c = first + tl.arange(0, SCORE_CHUNK)
            c_start = tl.load(scratch + c)
            c_size = tl.load(scratch + 2 * NUM_GROUPS + c)
            rep = tl.minimum(c_start + c_size // 2, last)  # the center block of the half
            score = _block_scores(qs, s_ok, k_base, stride_kt, rep, c_size == 0, num_keys, d_idx, d_ok, BLOCK_K, IEEE)
            tl.store(scratch + 4 * NUM_GROUPS + c, _sortable(score))
        tl.debug_barrier()
        # one int64 key per candidate: score order first, the candidate index makes keys unique
        score_bits = tl.load(scratch + 4 * NUM_GROUPS + cand)
        ranked = tl.sort((score_bits.to(tl.int64) << 32) | cand.to(tl.int64), descending=True)
        best, _ = tl.split(tl.trans(tl.reshape(ranked, (2, NUM_GROUPS))))
        chosen = (best & 0xFFFF).to(tl.int32)  # the candidate index (2 K_b <= 65536)
        starts = tl.load(scratch + chosen)
        sizes = tl.load(scratch + 2 * NUM_GROUPS + chosen)
        tl.debug_barrier()
    out = OUT + program * (2 * NUM_GROUPS)
    tl.store(out + g, starts)
    tl.store(out + NUM_GROUPS + g, sizes)


def search(
    query: torch.Tensor,
    key: torch.Tensor,
    geo: SparseGeometry,
    num_groups: int,
    query_stride: int,
    score_chunk: int | None = None,
    num_warps: int = SEARCH_NUM_WARPS,
) -> KeyBlockSelection:
    """The branch-and-prune search of `search.hip_search`, one Triton program per query block.

    query [B, Hq, Tq, D], key [B, Hkv, Tk, D]. Returns the same `KeyBlockSelection` (blocks sorted,
    valid first).
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    nqb = geo.num_blocks
    query, key = query.contiguous(), key.contiguous()
    lo, hi = geo.lo.to(torch.int32).contiguous(), geo.hi.to(torch.int32).contiguous()
    rounds = search_rounds(geo.max_candidates, num_groups)  # host-side: no device sync
    programs = b * hq * nqb
    scratch = torch.empty(programs * 6 * num_groups, dtype=torch.int32, device=query.device)
    out = torch.empty(programs * 2 * num_groups, dtype=torch.int32, device=query.device)
    _search_kernel[(nqb, b * hq)](
        query, key, lo, hi, scratch, out,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        hq, hq // hkv, tq, tk, nqb, geo.block_q, query_stride, rounds,
        **search_constants(d, geo.block_q, query_stride, num_groups, geo.block_k, query.dtype, score_chunk),
        num_warps=num_warps,
    )  # fmt: skip
    out = out.view(b, hq, nqb, 2, num_groups).long()
    starts, sizes = out[..., 0, :], out[..., 1, :]
    valid = sizes == 1
    blocks = torch.where(valid, starts, torch.zeros_like(starts))
    order = torch.where(valid, blocks, torch.full_like(blocks, torch.iinfo(torch.int64).max)).argsort(dim=-1)
    return KeyBlockSelection(blocks=blocks.gather(-1, order), valid=valid.gather(-1, order), rounds=rounds)


@triton.jit
def _attend(
    q, acc, m_i, l_i, count, k_base, v_base, stride_kt, stride_vt, token, load_ok, ok, scale, d_idx, d_ok,
    IEEE: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over the keys `token` (mask `ok` [rows, keys])."""
    kv_ok = load_ok[:, None] & d_ok[None, :]
    keys = tl.load(k_base + token[:, None] * stride_kt + d_idx[None, :], mask=kv_ok, other=0.0)
    values = tl.load(v_base + token[:, None] * stride_vt + d_idx[None, :], mask=kv_ok, other=0.0)
    scores = _dot(q, tl.trans(keys), IEEE) * scale
    scores = tl.where(ok, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    probs = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + _dot(probs.to(values.dtype), values, IEEE)
    count += tl.sum(ok.to(tl.int32), axis=1)
    return acc, m_new, l_i, count


@triton.jit
def _attention_kernel(
    Q, K, V, SEL, NSEL, OUT, COUNT, TOTALS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_ot, stride_oh,
    num_heads, groups, num_queries, num_keys, num_qblocks, block_q, sinks, window, scale, num_groups,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr, ROW_COUNTS: tl.constexpr, HAS_TOTALS: tl.constexpr,
):  # fmt: skip
    qblock, bh, batch, head, kv_head, program = _program(num_heads, groups, num_qblocks)

    d_idx = tl.arange(0, BLOCK_D)
    d_ok = d_idx < HEAD_DIM
    m_idx = tl.arange(0, BLOCK_M)
    rows = qblock * block_q + m_idx
    row_ok = (m_idx < block_q) & (rows < num_queries)
    pos = num_keys - num_queries + rows
    q_ptr = Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qt + d_idx[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    count = tl.zeros((BLOCK_M,), tl.int32)
    n_idx = tl.arange(0, BLOCK_N)

    # 1. sinks (causal)
    for start in range(0, sinks, BLOCK_N):
        token = start + n_idx
        load_ok = (token < sinks) & (token < num_keys)
        ok = load_ok[None, :] & (token[None, :] <= pos[:, None]) & row_ok[:, None]
        acc, m_i, l_i, count = _attend(
            q, acc, m_i, l_i, count, k_base, v_base, stride_kt, stride_vt, token, load_ok, ok, scale, d_idx, d_ok, IEEE
        )

    # 2. selected blocks: keys at or before (position - window), not sinks
    n_valid = tl.load(NSEL + program)
    sel_base = SEL + program * num_groups
    for start in range(0, n_valid * BLOCK_K, BLOCK_N):
        j = start + n_idx
        in_sel = j // BLOCK_K < n_valid
        block = tl.load(sel_base + j // BLOCK_K, mask=in_sel, other=0)
        token = block * BLOCK_K + j % BLOCK_K
        load_ok = in_sel & (token >= sinks) & (token < num_keys)
        ok = load_ok[None, :] & (token[None, :] <= pos[:, None] - window) & row_ok[:, None]
        acc, m_i, l_i, count = _attend(
            q, acc, m_i, l_i, count, k_base, v_base, stride_kt, stride_vt, token, load_ok, ok, scale, d_idx, d_ok, IEEE
        )

    # 3. window: the last `window` keys of every row, past the sinks (causal)
    first = num_keys - num_queries + qblock * block_q - window + 1
    low = tl.maximum(pos - window, sinks - 1)
    for start in range(0, window + block_q - 1, BLOCK_N):
        token = first + start + n_idx
        load_ok = (token >= 0) & (token < num_keys)
        ok = load_ok[None, :] & (token[None, :] > low[:, None]) & (token[None, :] <= pos[:, None]) & row_ok[:, None]
        acc, m_i, l_i, count = _attend(
            q, acc, m_i, l_i, count, k_base, v_base, stride_kt, stride_vt, token, load_ok, ok, scale, d_idx, d_ok, IEEE
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = OUT + batch * stride_ob + rows[:, None] * stride_ot + head * stride_oh + d_idx[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if ROW_COUNTS:
        tl.store(COUNT + bh * num_queries + rows, count, mask=row_ok)
    if HAS_TOTALS:  # the session's running [sum, max] of keys attended per row, without a launch or sync
        count = tl.where(row_ok, count, 0).to(tl.int64)
        tl.atomic_add(TOTALS, tl.sum(count, axis=0))
        tl.atomic_max(TOTALS + 1, tl.max(count, axis=0))


def pack(sel: KeyBlockSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection as the attention kernel reads it: int32 block ids [B, Hq, nQB, K_b], valid counts [B, Hq, nQB]."""
    return sel.blocks.to(torch.int32).contiguous(), sel.valid.sum(-1, dtype=torch.int32).contiguous()


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: tuple[torch.Tensor, torch.Tensor],
    *,
    block_q: int,
    block_k: int,
    sinks: int,
    window: int,
    scaling: float,
    totals: torch.Tensor | None = None,
    row_counts: bool = False,
    block_n: int | None = None,
    num_warps: int = ATTENTION_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention.sparse_attention` in one Triton kernel, from scalars and a `pack`ed selection.

    No geometry tensors are needed, so a decode step between refreshes launches this kernel alone.

    Returns (output [B, Tq, Hq, D], keys attended per row [B, Hq, Tq] if `row_counts` else None).
    `totals` (int64 [2] on the device), if given, gets the sum of keys attended over rows added to
    [0] and their max folded into [1], inside the kernel.
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    blocks, n_valid = packed
    nqb = -(-tq // block_q)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    out = torch.empty(b, tq, hq, d, dtype=query.dtype, device=query.device)
    counts = torch.empty(b, hq, tq, dtype=torch.int32, device=query.device) if row_counts else out
    _attention_kernel[(nqb, b * hq)](
        query, key, value, blocks, n_valid, out, counts, totals if totals is not None else out,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, tq, tk, nqb, block_q, sinks, window, scaling, blocks.shape[-1],
        **attention_constants(d, block_q, block_k, query.dtype, block_n, row_counts, totals is not None),
        num_warps=num_warps,
    )  # fmt: skip
    return out, counts.long() if row_counts else None
