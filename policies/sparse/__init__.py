"""The block-sparse attention layer that sparse policies share: selections in, exact attention out.

A sparse policy decides which keys each query block attends; this package turns that choice into
attention output, on every device, with back-ends that have one meaning (the tests check each
against the others and against dense attention with the equivalent token mask). FlexPrefill
(arXiv 2502.20766) and HiP (arXiv 2406.09827) both call it; their pattern selection and search stay
in their own packages.

Two forms of a selection, one a special case of the other:
- a **block grid** (`grid.py`): bool [B|1, H|1, nqb, nkb], one block size for queries and keys on
  the absolute block grid, True = compute the cell, the diagonal always computed, causal inside.
  FlexPrefill's form: its cells are large (128 x 128) and a row may keep any number of them.
- a **key-block selection** (`selection.py`): per (batch, query head, query block) a padded list of
  key-block ids, the key block size b_k independent of the query block size b_q, plus the `sinks`
  first tokens and each query's own `window` of last tokens, all in one softmax. HiP's form: its
  key blocks are tiny (b_k = 2) and every row keeps the same number of them, so a grid of its cells
  would be far too large at long context (at 128K, b_q 32 and b_k 2: 4096 x 65536 cells per head
  and layer, against 4096 x 256 ids).
A grid is the selection with b_q = b_k, no sinks and no window (`grid.grid_as_selection`); the
tests run converted grids through the selection's back-ends and get the grid's results.

Entry points (`attention.py`) and back-ends:

- grid: `block_sparse_attention`; back-ends `eager` (`eager.py`: CPU, and the reference) and
  `flex` (`flex.py`: CUDA).
- selection: `key_block_attention`; back-ends `fast` and `reference` (`gather.py`: CPU, and the
  reference); `triton_backend()` returns the CUDA back-end (`triton_attention.py`).

Why two computations and not one: the grid's eager back-end groups rows by their exact width and
masks only the diagonal cell, which is what keeps FlexPrefill's CPU prefill fast; run through the
selection's `fast` back-end, a converted grid pads every row to the widest one and masks every key
per query row, and FlexPrefill's prefill is slower (docs/results/flexprefill.md, "One sparse
layer"). The other way round, HiP's two-token key blocks and per-row windows do not fit the grid's
large cells, and flex_attention's block masks are too coarse for them. So both computations stay,
behind one layer with one set of semantics.

Triton is imported only when its back-end runs (`triton_backend()`): this package imports on
machines without it.
"""

from kvmux.policies.sparse.attention import Backend, block_sparse_attention, key_block_attention, triton_backend
from kvmux.policies.sparse.eager import EAGER_CELLS_PER_BATCH
from kvmux.policies.sparse.grid import (
    block_sparse_flops,
    blocks_from_indices,
    causal_blocks,
    density,
    diagonal_blocks,
    first_query_block,
    grid_as_selection,
    normalize_blocks,
    num_blocks,
    query_blocks,
)
from kvmux.policies.sparse.selection import KeyBlockSelection, SparseGeometry, slice_bytes

__all__ = [
    "EAGER_CELLS_PER_BATCH",
    "Backend",
    "KeyBlockSelection",
    "SparseGeometry",
    "block_sparse_attention",
    "block_sparse_flops",
    "blocks_from_indices",
    "causal_blocks",
    "density",
    "diagonal_blocks",
    "first_query_block",
    "grid_as_selection",
    "key_block_attention",
    "normalize_blocks",
    "num_blocks",
    "query_blocks",
    "slice_bytes",
    "triton_backend",
]
