"""HiP (arXiv 2406.09827): the policy (`policy.py`), its branch-and-prune search (`search.py`) and the search
as a Triton kernel (`triton_search.py`). The sparse attention over the search's selection is the shared
block-sparse layer's (`kvmux.policies.sparse`, key-block selection form).

Importing the package registers the policy. The Triton kernels are imported only when they run (they
need the optional `triton` package), never here.
"""

from kvmux.policies.hip import policy  # noqa: F401  (registers the policy)
