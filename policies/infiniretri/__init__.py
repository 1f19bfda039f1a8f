"""InfiniRetri (arXiv 2502.12962): the policy (`policy.py`) and its sentence and chunk splitting (`sentences.py`).

Importing the package registers the policy.
"""

from kvmux.policies.infiniretri import policy  # noqa: F401  (registers the policy)
