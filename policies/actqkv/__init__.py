"""ActQKV (arXiv 2502.13542): the policy, its algorithm and deviations (`policy.py`), one request's
session (`session.py`) and the pieces it uses: parameters, block budget, question vector, grouped
attention, and the InfLLM-style context memory (`context_memory.py`).

Importing the package registers the policy.
"""

from kvmux.policies.actqkv import policy  # noqa: F401  (registers the policy)
