"""Split-KV decode attention on CPU: a decode row's keys cut into parts so every thread has work.

Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for long-context inference")
splits the keys of a decode step into chunks, attends each chunk in parallel and merges the
partial results by their log-sum-exps. PyTorch's CPU flash kernel parallelises over
(batch, head, query block) only, so a folded GQA decode row (`dense.sdpa`: one block of rows per
KV head) gives it as many tasks as KV heads: the embedded model's 3 KV heads on 2 threads leave
one thread idle for a third of the step. Here the keys of each KV head become `parts` overlapping
windows of one strided view (`Tensor.unfold`, no copy), passed to the kernel as a batch of `parts`;
when the windows overlap (the length is not a multiple), the overlap is masked out of every
window but the first, so each key counts once. The parts are merged in fp32.

Used for batch-1 decode rows on CPU with at least `MIN_KEYS_PER_PART` keys per part; everything
else keeps the plain folded call.
"""

from __future__ import annotations

import math

import torch

MIN_KEYS_PER_PART = 2048
MAX_PARTS = 8


def split_parts(kv_heads: int, num_keys: int, threads: int) -> int:
    """How many key windows make kv_heads * parts tasks a multiple of the threads (1: no split)."""
    if threads <= 1:
        return 1
    parts = threads // math.gcd(kv_heads, threads)
    parts = min(parts, MAX_PARTS, num_keys // MIN_KEYS_PER_PART)
    return max(1, parts)


def split_decode(
    folded: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, parts: int
) -> torch.Tensor:
    """folded [1, Hkv, G, D] query rows, key/value [1, Hkv, L, D] -> [1, Hkv, G, D], attended in `parts` windows."""
    length = key.shape[2]
    size = -(-length // parts)  # window length
    step = (length - size) // (parts - 1)
    size = length - step * (parts - 1)  # the windows end exactly at the last key
    overlap = size - step
    # [Hkv, parts, D, size] -> [parts, Hkv, size, D]: window p holds keys p*step .. p*step+size-1
    keys = key[0].unfold(1, size, step).permute(1, 0, 3, 2)
    values = value[0].unfold(1, size, step).permute(1, 0, 3, 2)
    mask = None
    if overlap > 0:
        mask = torch.zeros(parts, 1, 1, size, dtype=folded.dtype, device=folded.device)
        mask[1:, :, :, :overlap] = float("-inf")  # keys already in the previous window
    query = folded.expand(parts, *folded.shape[1:])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, keys, values, attn_mask=mask, scale=scaling
    )
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # [parts, Hkv, G, 1]
    return (out.float() * weights).sum(0, keepdim=True).to(folded.dtype)
