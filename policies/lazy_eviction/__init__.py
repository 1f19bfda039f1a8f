"""LazyEviction (arXiv 2506.15969): the policy (`policy.py`), its per-token recurrence record and
score (`recurrence.py`) and its score-based eviction math (`eviction.py`).

Importing the package registers the policy.
"""

from kvmux.policies.lazy_eviction import policy  # noqa: F401  (registers the policy)
