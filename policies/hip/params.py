"""HiP's request parameters (arXiv 2406.09827): the paper's defaults, bounds, and the kernel choice.

The algorithm and its deviations from the paper are described in `policy.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvmux.policies.base import PolicyParams
from kvmux.policies.hip.search import ScoreMode

Kernel = Literal["auto", "fast", "reference", "triton"]
Search = Literal["hierarchical", "exact"]
ResolvedKernel = Literal["fast", "reference", "triton"]


class HipParams(PolicyParams):
    mask_k: int = Field(
        512, ge=1, le=16384, description="k: key tokens selected per query block (paper: 512; at most 16384)"
    )
    block_size_q: int = Field(
        32, ge=1, le=128, description="b_q: queries sharing one selection (paper: 32; at most 128)"
    )
    block_stride_q: int = Field(
        2, ge=1, le=128, description="b_sq: every b_sq-th query scores branches (paper: 2; at most 128)"
    )
    block_size_k: int = Field(2, ge=1, le=64, description="b_k: tokens per key block (paper: 2; at most 64)")
    sink_tokens: int = Field(16, ge=0, le=4096, description="first tokens always attended (paper: 16; at most 4096)")
    window: int = Field(256, ge=1, le=16384, description="last tokens always attended (paper: 256; at most 16384)")
    dense_layers: int = Field(3, ge=0, le=1024, description="l_d: first layers kept dense (paper: 3; at most 1024)")
    refresh_interval: int = Field(
        8, ge=1, le=1024, description="r_m: decode steps between searches (paper: 8; at most 1024)"
    )
    search: Search = Field(
        "hierarchical",
        description="hierarchical: the paper's branch-and-prune search; exact: the top mask_k / block_size_k key "
        "blocks by the same block score (quadratic scoring, not the paper's method)",
    )
    exact_layers: int = Field(
        0,
        ge=0,
        le=1024,
        description="layers below this index take the exact top blocks while the others run `search` (0: none; "
        "not the paper's method)",
    )
    score_mode: ScoreMode = Field("auto", description="branch scoring: gathered representatives or a score table")
    kernel: Kernel = Field("auto", description="implementation: auto, fast, reference or triton (see module doc)")
    retrieval_heads: int = Field(
        0, ge=0, le=4096, description="the N best heads of the model's retrieval-head profile attend densely (0: off)"
    )
    gate_heads: int = Field(
        0,
        ge=0,
        le=4096,
        description="N more heads attend densely: those of largest HiP gate gain in the profile (kvmux calibrate "
        "--gates; 0: off)",
    )

    @model_validator(mode="after")
    def _check(self) -> HipParams:
        if self.mask_k % self.block_size_k:
            raise ValueError(f"mask_k ({self.mask_k}) must be a multiple of block_size_k ({self.block_size_k})")
        if self.block_stride_q > self.block_size_q:
            raise ValueError("block_stride_q must not exceed block_size_q")
        return self

    @property
    def budget(self) -> int:
        """Most keys one query attends on the sparse path."""
        return self.mask_k + self.sink_tokens + self.window

    @property
    def effective_refresh(self) -> int:
        return min(self.refresh_interval, self.window)
