"""HiP's branch-and-prune search as one Triton kernel (arXiv 2406.09827), for CUDA.

The paper's speed comes from fused kernels: one program per (head, query block) keeps the search
rounds on chip. This kernel computes what `search.hip_search` computes; the tests run it through
Triton's interpreter on CPU and compare its selection with the PyTorch search's. For fp32 inputs the
selection is the same. For bf16, branch scores accumulate in fp32 here, while the PyTorch search
rounds them to bf16, so near-ties may break differently. The attention over the selection is the
sparse layer's Triton back-end (`kvmux.policies.sparse.triton_attention`), whose program grid,
fp32 dot and interpreter rules this kernel shares.

Per (batch, query head, query block) one program splits the candidate key blocks [lo, hi) into K_b
groups, then for each round scores the two halves of every group by their center block (max of
q . k over the block's sampled queries and the b_k keys, fp32, unscaled), sorts the 2 K_b scores on
chip (scores packed with the candidate index into one int64 key, so the order is total) and keeps
the best K_b. Candidates and scores go through a small scratch buffer in global memory because
Triton has no register gather; the candidates are scored `SEARCH_SCORE_CHUNK` at a time, so only a
chunk's key tile occupies registers (the chunk changes registers and speed, never the selection).
K_b must be a power of two in [16, 2^15] (the paper's 256 is); other values use the PyTorch search.
Decode (one query) runs the same kernel with b_q = 1. `scripts/compile_hip_kernels.py` compiles
every launch for sm_80/sm_89/sm_90 without a GPU and reports registers and spills.

The module imports `triton` at the top: the policy imports it only where it runs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvmux.policies.sparse.selection import KeyBlockSelection, SparseGeometry
from kvmux.policies.sparse.triton_attention import MIN_DOT, dot, exact_dots, program_ids

SEARCH_NUM_WARPS = 8
# candidates scored per step, by launch: prefill (thousands of programs) is bound by occupancy, so a
# 64 x D key tile keeps it at 128 registers a thread without spills (bf16, D 128; scoring all 512
# at once takes 255 and spills); decode (one program per head, a few dozen) is bound by latency, so
# it scores in fewer, larger steps. fp32 tiles take twice the shared memory: 256 x 128 of them need
# 276 KB, more than any GPU gives one program, so fp32 stays at 64.
SEARCH_SCORE_CHUNK = 64
SEARCH_SCORE_CHUNK_DECODE = 256


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


def search_rounds(max_candidates: int, num_groups: int) -> int:
    """Rounds until every group holds at most one block: ceil(log2(largest initial group))."""
    largest = -(-max_candidates // num_groups)
    return math.ceil(math.log2(largest)) if largest > 1 else 0


@triton.jit
def _sortable(x):
    """fp32 -> int32 whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _block_scores(
    qs, s_ok, k_base, stride_kt, rep, empty, num_keys, d_idx, d_ok, BLOCK_K: tl.constexpr, IEEE: tl.constexpr
):
    """Max of q . k over the sampled queries and the BLOCK_K keys of each representative block."""
    best = tl.full(rep.shape, float("-inf"), tl.float32)
    for offset in tl.static_range(BLOCK_K):
        token = tl.minimum(rep * BLOCK_K + offset, num_keys - 1)
        keys = tl.load(k_base + token[:, None] * stride_kt + d_idx[None, :], mask=d_ok[None, :], other=0.0)
        scores = dot(qs, tl.trans(keys), IEEE)
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
    qblock, bh, batch, head, kv_head, program = program_ids(num_heads, groups, num_qblocks)

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
    return KeyBlockSelection.from_unordered(starts, sizes == 1, rounds)
