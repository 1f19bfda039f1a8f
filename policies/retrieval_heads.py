"""Retrieval heads for the sparse policies: which heads a request keeps dense, and their attention.

Retrieval Heads (Wu et al., 2024, https://arxiv.org/abs/2404.15574) shows that a few model-specific
heads do the copying from far context; DuoAttention (arXiv 2410.10819) and RazorAttention (arXiv
2407.15891) keep those heads whole and compress the rest. HiP and FlexPrefill take a parameter
`retrieval_heads` = N: the N best-scored heads of the model's retrieval-head profile (over all layers,
`ModelInfo.retrieval_heads`, measured by `kvmux calibrate`) attend densely; 0 turns it off. A request
that asks for them on a model without a profile gets a 400 naming the parameter. ActQKV, which
selects one block set per layer, takes `retrieval_layers` = N instead: the N layers whose heads score
highest on average attend every block. HiP also takes `gate_heads` = N: the N heads (besides the
retrieval heads) whose sparse attention costs the answer most by the profile's gate gains for HiP
(`kvmux calibrate --gates`, `kvmux.evals.calibrate.gates`, DuoAttention's gate in one gradient step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvmux.errors import PolicyInputError
from kvmux.policies.attention_call import AttentionCall
from kvmux.policies.dense import sdpa

if TYPE_CHECKING:
    from kvmux.models.info import ModelInfo

PARAM = "kv_policy.retrieval_heads"


def retrieval_head_mask(info: ModelInfo, count: int, policy: str) -> torch.Tensor | None:
    """bool [layers, query heads] of the `count` best retrieval heads (None for 0); PolicyInputError when
    the model has no profile or fewer heads."""
    if count <= 0:
        return None
    profile = info.retrieval_heads
    if profile is None:
        raise PolicyInputError(
            f"{policy}: retrieval_heads {count} needs a retrieval-head profile of {info.served_name}, and none "
            "was found for these weights; run `kvmux calibrate` for this model, or set retrieval_heads to 0",
            PARAM,
        )
    total = profile.num_layers * profile.num_heads
    if count > total:
        raise PolicyInputError(f"{policy}: retrieval_heads {count} exceeds the model's {total} heads", PARAM)
    return profile.head_mask(count).to(info.device)


def dense_head_mask(info: ModelInfo, retrieval: int, gate: int, policy: str) -> torch.Tensor | None:
    """bool [layers, query heads] a sparse policy keeps dense: the `retrieval` best retrieval heads and the
    `gate` heads of largest gate gain among the rest (None when both are 0); PolicyInputError when the
    profile lacks what is asked for."""
    mask = retrieval_head_mask(info, retrieval, policy)
    if gate <= 0:
        return mask
    param = "kv_policy.gate_heads"
    profile = info.retrieval_heads
    if profile is None or policy not in profile.gates:
        raise PolicyInputError(
            f"{policy}: gate_heads {gate} needs {policy} gate gains in the retrieval-head profile of "
            f"{info.served_name}, and {'there is no profile' if profile is None else 'it has none'}; run "
            f"`kvmux calibrate --gates <a {policy} preset>` for this model, or set gate_heads to 0",
            param,
        )
    taken = int(mask.sum()) if mask is not None else 0
    if taken + gate > profile.num_layers * profile.num_heads:
        raise PolicyInputError(f"{policy}: retrieval_heads + gate_heads exceed the model's heads", param)
    gated = profile.gate_mask(policy, gate, mask).to(info.device)
    return gated if mask is None else mask | gated


def retrieval_layer_set(info: ModelInfo, count: int, policy: str) -> frozenset[int]:
    """The `count` layers of best mean retrieval score (empty for 0); PolicyInputError as above."""
    if count <= 0:
        return frozenset()
    param = "kv_policy.retrieval_layers"
    profile = info.retrieval_heads
    if profile is None:
        raise PolicyInputError(
            f"{policy}: retrieval_layers {count} needs a retrieval-head profile of {info.served_name}, and none "
            "was found for these weights; run `kvmux calibrate` for this model, or set retrieval_layers to 0",
            param,
        )
    if count > profile.num_layers:
        raise PolicyInputError(
            f"{policy}: retrieval_layers {count} exceeds the model's {profile.num_layers} layers", param
        )
    return frozenset(profile.top_layers(count))


def heads_per_layer(mask: torch.Tensor | None, num_layers: int) -> list[torch.Tensor | None]:
    """Per layer: the long indices of its dense query heads, or None where it has none."""
    out: list[torch.Tensor | None] = [None] * num_layers
    if mask is not None:
        for layer in range(num_layers):
            heads = mask[layer].nonzero()[:, 0]
            out[layer] = heads if heads.numel() else None
    return out


def dense_heads_into(out: torch.Tensor, call: AttentionCall, heads: torch.Tensor) -> None:
    """Overwrite `out` [B, Tq, Hq, D] at query heads `heads` with their dense causal attention."""
    kv = heads // call.num_kv_groups
    out[:, :, heads] = sdpa(call.query[:, heads], call.key[:, kv], call.value[:, kv], call.mask, call.scaling)


def visible_keys(call: AttentionCall, num_heads: int) -> float:
    """Keys dense causal attention reads for `num_heads` query heads of this call, summed over rows."""
    b, _, tq = call.query.shape[:3]
    tk = call.key.shape[2]
    return float(b * num_heads * (tq * (tk - tq) + tq * (tq + 1) / 2))
