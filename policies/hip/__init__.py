"""HiP (arXiv 2406.09827): the policy (`policy.py`), its branch-and-prune search (`search.py`), its PyTorch
sparse attention (`attention.py`), the shared types (`types.py`) and the Triton kernels (`triton_kernels.py`).

Importing the package registers the policy. The Triton kernels are imported only when they run (they
need the optional `triton` package), never here.
"""

from kvmux.policies.hip import policy  # noqa: F401  (registers the policy)
