"""InfiniRetri (arXiv 2502.12962): the policy, its algorithm and deviations (`policy.py`), one
request's session (`session.py`) and the pieces it uses: parameters, prompt layout, sentence and
chunk splitting (`sentences.py`), and the scoring that selects sentences.

Importing the package registers the policy.
"""

from kvmux.policies.infiniretri import policy  # noqa: F401  (registers the policy)
