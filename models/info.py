"""Static facts about the served model that policies and the server need (no policy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvmux.models.retrieval_profile import RetrievalProfile


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model that policies and the server need."""

    config: object
    served_name: str
    root: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    dtype: torch.dtype
    device: torch.device
    inv_freq: torch.Tensor  # RoPE inverse frequencies [D/2], fp32
    rope_scaling: float  # attention_scaling folded into cos/sin by the model
    tokenizer: object | None = None  # for policies that re-read text (InfiniRetri)
    # retrieval score of every head (`kvmux calibrate`), found by the loader for these weights; None if none
    retrieval_heads: RetrievalProfile | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers and KV heads."""
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_model(
        cls,
        model,
        served_name: str,
        root: str,
        max_len: int | None = None,
        tokenizer: object | None = None,
        retrieval_heads: RetrievalProfile | None = None,
    ) -> ModelInfo:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        rotary = model.model.rotary_emb
        param = next(model.parameters())
        return cls(
            config=cfg,
            served_name=served_name,
            root=root,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_context=max_len or cfg.max_position_embeddings,
            dtype=param.dtype,
            device=param.device,
            inv_freq=rotary.inv_freq.detach().float().clone(),
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            tokenizer=tokenizer,
            retrieval_heads=retrieval_heads,
        )
