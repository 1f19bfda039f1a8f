"""The key-block selection's CUDA back-end: one Triton kernel, sinks + selected blocks + window, one online softmax.

Same meaning as the PyTorch back-ends (`gather.py`): per (batch, query head, query block) one
program runs an online softmax over the sinks, the selected key blocks (keys gathered by index
inside the kernel, nothing materialised) and the window, with the same masks as `gather.segments`
(each key once, causal). It folds the keys every query row attended into a running sum and max on
the device (atomics, for a session's stats) and can return the per-row counts. This is the
block-sparse flash kernel of HiP's v1.1 implementation (arXiv 2406.09827); the tests run it through
Triton's CPU interpreter against the PyTorch back-ends and a dense-mask oracle.

Decode (one query) runs the same kernel with b_q = 1; the 16-row tiles `tl.dot` needs are masked.
Dots accumulate in fp32; bf16/fp16 operands use the tensor cores on CUDA. Under the interpreter
operands are upcast to fp32 first, because the interpreter's own bf16 dot gives wrong results.

The module imports `triton` at the top: import it only where it runs (`attention.triton_backend()`
returns it, or None where Triton is missing). `program_ids`, `dot` and `exact_dots` are shared with
other Triton kernels over the same grid of programs (HiP's search kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvmux.policies.sparse.selection import KeyBlockSelection

MIN_DOT = 16  # smallest tile side tl.dot accepts
ATTENTION_NUM_WARPS = 4
# keys per online-softmax step: 64 for 16-bit inputs; 32 for fp32, whose 64-key steps need 155 KB of
# shared memory at D 128 (more than sm_86/sm_89 give) and spill, while 32-key steps need 86 KB
ATTENTION_BLOCK_N = 64
ATTENTION_BLOCK_N_FP32 = 32


def exact_dots(dtype: torch.dtype) -> bool:
    """fp32 dots: for fp32 inputs, and always under Triton's CPU interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


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


@triton.jit
def program_ids(num_heads, groups, num_qblocks):
    """Grid (query block, batch x query head) -> (query block, bh, batch, head, KV head, flat program id)."""
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    head = bh % num_heads
    return qblock, bh, bh // num_heads, head, head // groups, bh * num_qblocks + qblock


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE: fp32 operands and exact products (no TF32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attend(
    q, acc, m_i, l_i, count, k_base, v_base, stride_kt, stride_vt, token, load_ok, ok, scale, d_idx, d_ok,
    IEEE: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over the keys `token` (mask `ok` [rows, keys])."""
    kv_ok = load_ok[:, None] & d_ok[None, :]
    keys = tl.load(k_base + token[:, None] * stride_kt + d_idx[None, :], mask=kv_ok, other=0.0)
    values = tl.load(v_base + token[:, None] * stride_vt + d_idx[None, :], mask=kv_ok, other=0.0)
    scores = dot(q, tl.trans(keys), IEEE) * scale
    scores = tl.where(ok, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    probs = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + dot(probs.to(values.dtype), values, IEEE)
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
    qblock, bh, batch, head, kv_head, program = program_ids(num_heads, groups, num_qblocks)

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
    """`attention.key_block_attention` in one Triton kernel, from scalars and a `pack`ed selection.

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
