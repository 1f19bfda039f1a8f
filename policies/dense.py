"""Dense attention helpers shared by every policy: SDPA with a bottom-right causal mask.

The mask convention everywhere in kvmux: queries are the last Tq positions of the Tk keys, so
query i may see keys 0 .. Tk - Tq + i, and a mask of None means exactly that (the registered mask
function hands None for it; see `hook.causal_or_none`). A chunk of queries after a cached prefix
(1 < Tq < Tk) never materialises that mask: on CPU the chunk attends the prefix without a mask
and itself causally, and the two partial results are merged by their log-sum-exp (exact up to
rounding); elsewhere SDPA gets a lower-right `CausalBias`, which the fused CUDA kernels take as is.
A decode row with GQA folds each KV head's query heads into one block of rows, so each cached key is
read once per step instead of once per query head; on CPU its keys are also split into windows
when the KV heads alone would leave threads idle (`split_decode`, Flash-Decoding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvmux.policies.split_decode import split_decode, split_parts

if TYPE_CHECKING:
    from kvmux.policies.attention_call import AttentionCall


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """bool [Tq, Tk]: True where query i (the (Tk-Tq+i)-th token) may attend key j."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    k_pos = torch.arange(num_keys, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv*groups, T, D] (query-head order)."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Dense attention [B, Hq, Tq, D] -> output [B, Tq, Hq, D]; mask None means causal.

    GQA runs natively (no copy of K/V per query head) and a square causal call uses the
    kernel's own causal path, so the fast fused kernels stay available.
    """
    tq, tk = query.shape[2], key.shape[2]
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    if mask is None and tq == 1 and hq != hkv:
        # one decode row per query head: a KV head's query heads become one block of rows over its keys,
        # so each key is read once (not once per query head, as a per-head kernel reads it)
        folded = query.reshape(b, hkv, hq // hkv, d)
        parts = split_parts(hkv, tk, torch.get_num_threads()) if b == 1 and query.device.type == "cpu" else 1
        if parts > 1:
            out = split_decode(folded, key, value, scaling, parts)
        else:
            out = F.scaled_dot_product_attention(folded, key, value, scale=scaling)
        return out.reshape(b, 1, hq, d)
    is_causal = False
    if mask is None and tq > 1:
        if tq == tk:
            is_causal = True
        elif query.device.type == "cpu":
            return _after_prefix_cpu(query, key, value, scaling).transpose(1, 2).contiguous()
        else:
            mask = causal_lower_right(tq, tk)
    gqa = hq != hkv
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous()


def _after_prefix_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of Tq queries that follow a cached prefix of Tk - Tq keys: [B, Hq, Tq, D].

    The prefix is attended without a mask (with GQA, a KV head's query heads are folded into one
    longer query block, so keys are never repeated), the chunk's own keys causally; the two partial
    softmaxes are merged with their log-sum-exps.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, hq, tq, d = query.shape
    hkv, prefix = key.shape[1], key.shape[2] - query.shape[2]
    groups = hq // hkv
    out_prefix, lse_prefix = flash(
        query.reshape(b, hkv, groups * tq, d), key[:, :, :prefix], value[:, :, :prefix], scale=scaling
    )
    chunk_k, chunk_v = repeat_kv(key[:, :, prefix:], groups), repeat_kv(value[:, :, prefix:], groups)
    out_chunk, lse_chunk = flash(query, chunk_k, chunk_v, is_causal=True, scale=scaling)
    lse_prefix = lse_prefix.reshape(b, hq, tq, 1)
    lse_chunk = lse_chunk.reshape(b, hq, tq, 1)
    top = torch.maximum(lse_prefix, lse_chunk)
    w_prefix, w_chunk = torch.exp(lse_prefix - top), torch.exp(lse_chunk - top)
    merged = out_prefix.reshape(b, hq, tq, d).float() * w_prefix + out_chunk.float() * w_chunk
    return (merged / (w_prefix + w_chunk)).to(query.dtype)


def dense_attention(call: AttentionCall) -> torch.Tensor:
    return sdpa(call.query, call.key, call.value, call.mask, call.scaling)


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact softmax probabilities in fp32: [B, Hq, Tq, D] x [B, Hkv, Tk, D] -> [B, Hq, Tq, Tk].

    Only for the few query rows a policy needs to observe (decode step, question rows).
    """
    groups = query.shape[1] // key.shape[1]
    scores = torch.matmul(query.float(), repeat_kv(key, groups).float().transpose(-1, -2)) * scaling
    tq, tk = query.shape[2], key.shape[2]
    if mask is None:
        mask = causal_mask(tq, tk, query.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)
