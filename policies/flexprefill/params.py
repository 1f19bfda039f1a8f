"""FlexPrefill's parameters (arXiv 2502.20766): block size, coverage gamma, pattern threshold tau, budgets, passes.

The defaults are the paper's; `policy.py` states what each one does and how the policy deviates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvmux.policies.base import PolicyParams

# longest forward FlexPrefill may run (a whole-prompt pass or an explicit chunk)
MAX_PASS_TOKENS = 131072


class FlexPrefillParams(PolicyParams):
    block_size: int = Field(128, ge=16, le=512, description="tokens per query/key block (paper: 128; at most 512)")
    gamma: float = Field(0.95, gt=0.0, le=1.0, description="attention mass each head must cover (paper: 0.9-0.95)")
    tau: float = Field(0.1, ge=0.0, le=1.0, description="sqrt-JSD threshold below which a head is query-aware")
    min_budget: int = Field(
        1024, ge=0, le=1 << 20, description="minimum vertical and slash budget, tokens (at most 1048576)"
    )
    max_budget: int | None = Field(
        None, ge=1, le=1 << 22, description="maximum vertical and slash budget, tokens (None = all; at most 4194304)"
    )
    prefill_chunk: int = Field(
        0,
        ge=0,
        le=MAX_PASS_TOKENS,
        description=f"0: one forward up to max_single_pass_tokens (paper); >0: chunk size (at most {MAX_PASS_TOKENS})",
    )
    max_single_pass_tokens: int = Field(
        8192,
        ge=128,
        le=MAX_PASS_TOKENS,
        description="with prefill_chunk 0: longest prompt prefilled in one forward; longer prompts are prefilled "
        f"in forwards of this many tokens, the last one ending at the prompt's end (at most {MAX_PASS_TOKENS})",
    )
    backend: Literal["auto", "eager", "flex"] = Field(
        "auto", description="block-sparse back-end (see kvmux.policies.sparse)"
    )
    retrieval_heads: int = Field(
        0, ge=0, le=4096, description="the N best heads of the model's retrieval-head profile keep every causal cell"
    )
    gate_heads: int = Field(
        0,
        ge=0,
        le=4096,
        description="besides the retrieval heads, the N heads of largest FlexPrefill gate gain in the profile "
        "(kvmux calibrate --gates) keep every causal cell",
    )
