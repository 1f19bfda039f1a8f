"""ActQKV (arXiv 2502.13542): the policy (`policy.py`) and its InfLLM-style context memory (`context_memory.py`).

Importing the package registers the policy.
"""

from kvmux.policies.actqkv import policy  # noqa: F401  (registers the policy)
