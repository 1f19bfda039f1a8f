"""`AttentionCall`: what one layer's attention call hands a policy session (shared by the interface
and the dense attention kernels, so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionCall:
    """One attention call of one layer.

    query: [B, Hq, Tq, D] after RoPE; key/value: [B, Hkv, Tk, D], the whole cache including the
    current tokens (not repeated for GQA); mask: bool [B, 1, Tq, Tk] (True = attend) or None,
    meaning plain causal aligned bottom-right (query i sees keys <= Tk - Tq + i).
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    position_ids: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.query.shape[2] == 1

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]
