"""Dense attention helpers shared by every policy: SDPA with a bottom-right causal mask.

The mask convention everywhere in kvmux: queries are the last Tq positions of the Tk keys, so
query i may see keys 0 .. Tk - Tq + i. transformers builds exactly this mask when the attention
function is registered together with `sdpa_mask`; when it hands us None we rebuild it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

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
    is_causal = False
    if mask is None and tq > 1:
        if tq == tk:
            is_causal = True
        else:
            mask = causal_mask(tq, tk, query.device)
    gqa = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous()


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
