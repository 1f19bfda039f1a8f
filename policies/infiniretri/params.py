"""InfiniRetri's request parameters (arXiv 2502.12962; the algorithm and its deviations: `policy.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kvmux.policies.base import PolicyParams


class InfiniRetriParams(PolicyParams):
    chunk_tokens: int = Field(
        1024, ge=16, le=16384, description="context tokens read per chunk (paper: 1024; at most 16384)"
    )
    top_k: int = Field(
        300, ge=1, le=16384, description="best-scored tokens whose sentences are kept (paper: 300; at most 16384)"
    )
    window: int = Field(
        8, ge=1, le=256, description="phrase window: token scores summed over this many (paper: 8; at most 256)"
    )
    layer: Annotated[int, Field(ge=-1024, le=1023)] | Literal["calibrated"] | None = Field(
        None,
        description="scoring layer (negative from the end; -1 = last, the paper; 'calibrated' = the layer of "
        "highest retrieval score in the model's retrieval-head profile; unset = layer_depth)",
    )
    layer_depth: float = Field(0.62, ge=0.0, le=1.0, description="when layer is unset: fraction of the layer stack")
    sink_tokens: int = Field(
        4, ge=0, le=1024, description="first positions of each scoring input left out (at most 1024)"
    )
    question_weight: bool = Field(True, description="weight question rows by their in-question attention squared")
    max_question_tokens: int = Field(
        512, ge=1, le=4096, description="longest default question paragraph (at most 4096)"
    )
