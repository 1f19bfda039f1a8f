"""FlexPrefill (arXiv 2502.20766): the policy and session (`policy.py`), the per-head pattern selection
(`patterns.py`) and the parameters (`params.py`). The block-sparse attention is the shared layer's
(`kvmux.policies.sparse`).

Importing the package registers the policy. The names below are the package's public API.
"""

from kvmux.policies.flexprefill.params import MAX_PASS_TOKENS, FlexPrefillParams
from kvmux.policies.flexprefill.patterns import (
    HeadPatterns,
    block_pool,
    budget_blocks,
    coverage_count,
    diagonal_sums,
    probe,
    query_aware_cells,
    select_blocks,
    sqrt_js_distance,
    top_mask,
)
from kvmux.policies.flexprefill.policy import FlexPrefillPolicy, FlexPrefillSession

__all__ = [
    "MAX_PASS_TOKENS",
    "FlexPrefillParams",
    "FlexPrefillPolicy",
    "FlexPrefillSession",
    "HeadPatterns",
    "block_pool",
    "budget_blocks",
    "coverage_count",
    "diagonal_sums",
    "probe",
    "query_aware_cells",
    "select_blocks",
    "sqrt_js_distance",
    "top_mask",
]
