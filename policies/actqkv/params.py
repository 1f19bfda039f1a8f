"""ActQKV's request parameters (arXiv 2502.13542; the algorithm and its deviations: `policy.py`).

Every cap here is a serving bound the reference does not have: it keeps one window's scores
(window x attended keys per head, fp32) bounded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvmux.policies.base import PolicyParams

# most keys one window's queries may attend (bounds one step's scores: window x keys x heads)
MAX_ATTENDED_KEYS = 16384


class ActQKVParams(PolicyParams):
    n_init: int = Field(64, ge=0, le=1024, description="initial tokens always attended (paper: 64; at most 1024)")
    n_local: int = Field(512, ge=1, le=4096, description="local window of recent tokens (paper: 512; at most 4096)")
    block_size: int = Field(32, ge=1, le=256, description="tokens per retrievable block (paper: 32; at most 256)")
    repr_topk: int = Field(
        4, ge=1, le=256, description="most-attended keys averaged into a block representative (at most 256)"
    )
    topk: int = Field(
        46, ge=1, le=1024, description="mean blocks per layer: pool topk*layers, cap 2*topk (46; at most 1024)"
    )
    min_blocks: int = Field(
        32, ge=0, le=1024, description="per-layer floor of retrieved blocks (reference: 32; at most 1024)"
    )
    window: int = Field(
        256, ge=1, le=512, description="queries per retrieval window while reading (paper: 256; at most 512)"
    )
    question_weight: float = Field(4.0, ge=0.0, le=100.0, description="weight of the question term (4)")
    question: Literal["auto", "query", "off"] = Field(
        "auto",
        description="question vector from: 'auto': kv_policy.query, else the prompt's trailing paragraph; "
        "'query': kv_policy.query only; 'off': none",
    )
    max_question_tokens: int = Field(
        1024, ge=1, le=4096, description="longest question found in the prompt: its last tokens (1024; at most 4096)"
    )
    entropy_history: int = Field(
        100, ge=1, le=100_000, description="entropy samples per layer for the split (100; at most 100000)"
    )
    stats_warmup: int = Field(
        2, ge=0, le=100_000, description="windows per layer with uniform probe weights (at most 100000)"
    )
    stats_horizon: int = Field(
        1000, ge=1, le=1_000_000, description="cap on windows in the running statistics (at most 1000000)"
    )
    positions: Literal["inf_llm", "ordered", "absolute"] = Field(
        "inf_llm",
        description="'inf_llm': local relative, global at n_local (paper); 'ordered': attended keys at "
        "consecutive slots in their order; 'absolute': true positions",
    )
    offload: bool = Field(False, description="keep blocks in CPU memory, copy the chosen ones per step")
    retrieval_layers: int = Field(
        0,
        ge=0,
        le=1024,
        description="the N layers of best calibrated retrieval score attend every block (needs the model's "
        "retrieval-head profile; 0: off)",
    )

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window > self.n_local:
            raise ValueError(f"window ({self.window}) must not exceed n_local ({self.n_local})")
        if self.attended_keys > MAX_ATTENDED_KEYS:
            raise ValueError(
                f"n_init + max(2*topk, min_blocks)*block_size + n_local + window is {self.attended_keys}; at most "
                f"{MAX_ATTENDED_KEYS} keys per query (one window's scores are window x that many per head)"
            )
        return self

    @property
    def attended_keys(self) -> int:
        """Most keys one query of a window attends: init + retrieved blocks + local window + window remainder."""
        return self.n_init + max(2 * self.topk, self.min_blocks) * self.block_size + self.n_local + self.window
