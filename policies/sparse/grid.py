"""The block grid form: a bool map of (query block, key block) cells on an absolute grid, and its helpers.

One block size `bs` for queries and keys. Key block c holds key positions [c*bs, (c+1)*bs); query
block r holds the queries whose absolute position (Tk - Tq + i, queries being the last Tq of the Tk
keys) lies in [r*bs, (r+1)*bs). With Tq < Tk (chunked prefill) the first query block may be
partial; it is row 0 of the grid, absolute block `first_query_block(Tq, Tk, bs)`.

A grid is a bool tensor `blocks` [B|1, H|1, nqb, nkb] (H = query heads; 1 broadcasts), True =
compute the cell. Inside the cells attention is exact: softmax over the union of the selected keys,
causal (query at position p sees keys <= p), so diagonal cells are triangular. Cells above the
diagonal are ignored and the diagonal cell of every row is always computed (`normalize_blocks`), so
every query sees at least itself. Selecting every causal cell gives dense causal attention.

A grid is the key-block selection (`selection.py`) with b_q = b_k = bs, no sinks and no window, its
ids the selected columns of each row: `grid_as_selection` converts, `blocks_from_indices` goes back.
"""

from __future__ import annotations

import torch

from kvmux.policies.sparse.selection import KeyBlockSelection, SparseGeometry


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def first_query_block(num_queries: int, num_keys: int, block_size: int) -> int:
    """Absolute block index of the first query (queries are the last `num_queries` of `num_keys`)."""
    return (num_keys - num_queries) // block_size


def query_blocks(num_queries: int, num_keys: int, block_size: int) -> int:
    """Number of (absolute) query blocks the queries touch."""
    return num_blocks(num_keys, block_size) - first_query_block(num_queries, num_keys, block_size)


def _block_offsets(num_queries: int, num_keys: int, block_size: int, device) -> torch.Tensor:
    """long [nqb, nkb]: absolute query block - key block of every cell."""
    first = first_query_block(num_queries, num_keys, block_size)
    rows = torch.arange(first, num_blocks(num_keys, block_size), device=device)
    cols = torch.arange(num_blocks(num_keys, block_size), device=device)
    return rows[:, None] - cols[None, :]


def causal_blocks(num_queries: int, num_keys: int, block_size: int, device=None) -> torch.Tensor:
    """bool [nqb, nkb]: every cell on or below the block diagonal."""
    return _block_offsets(num_queries, num_keys, block_size, device) >= 0


def diagonal_blocks(num_queries: int, num_keys: int, block_size: int, device=None) -> torch.Tensor:
    """bool [nqb, nkb]: the diagonal cell of every query block."""
    return _block_offsets(num_queries, num_keys, block_size, device) == 0


def blocks_from_indices(indices: torch.Tensor, counts: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Padded index table -> bool grid.

    indices: long [..., nqb, S] key-block ids; counts: [..., nqb], the first `counts` ids of each
    row are valid (the rest is padding). Returns bool [..., nqb, num_key_blocks].
    """
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    hits = torch.zeros(*indices.shape[:-1], num_key_blocks, dtype=torch.int32, device=indices.device)
    safe = torch.where(valid, indices, torch.zeros_like(indices)).long()
    return hits.scatter_add_(-1, safe, valid.to(torch.int32)) > 0


def normalize_blocks(
    blocks: torch.Tensor, batch: int, heads: int, num_queries: int, num_keys: int, block_size: int
) -> torch.Tensor:
    """Expand to [B, H, nqb, nkb], drop cells above the diagonal, add the diagonal."""
    nqb, nkb = query_blocks(num_queries, num_keys, block_size), num_blocks(num_keys, block_size)
    if blocks.dim() != 4 or tuple(blocks.shape[-2:]) != (nqb, nkb):
        raise ValueError(f"blocks must be [B|1, H|1, {nqb}, {nkb}], got {tuple(blocks.shape)}")
    offsets = _block_offsets(num_queries, num_keys, block_size, blocks.device)
    return ((blocks.bool() & (offsets >= 0)) | (offsets == 0)).expand(batch, heads, nqb, nkb)


def density(blocks: torch.Tensor, num_queries: int, num_keys: int, block_size: int) -> float:
    """Kept causal cells / all causal cells (after normalisation), averaged over batch and heads."""
    b, h = blocks.shape[0], blocks.shape[1]
    sel = normalize_blocks(blocks, b, h, num_queries, num_keys, block_size)
    total = causal_blocks(num_queries, num_keys, block_size).sum().item() * b * h
    return sel.sum().item() / total


def block_sparse_flops(sel: torch.Tensor, block_size: int, head_dim: int) -> int:
    """Multiply-adds of QK^T and PV over the selected cells (for reports)."""
    return int(sel.sum().item()) * 2 * block_size * block_size * head_dim


def grid_as_selection(
    sel: torch.Tensor, num_queries: int, num_keys: int, block_size: int
) -> tuple[KeyBlockSelection, SparseGeometry]:
    """A normalised grid [B, H, nqb, nkb] as the equivalent key-block selection and its geometry.

    b_q = b_k = block_size, no sinks, no window: each row's ids are its selected columns, ascending,
    padded to the widest row. The selection's query blocks start at the grid's first query block, so
    the geometry counts (num_keys - num_queries) % block_size extra queries in front: the caller pads
    the queries in front by that many rows and drops those rows from the output.
    """
    front = (num_keys - num_queries) % block_size
    counts = sel.sum(-1)
    width = max(int(counts.max()), 1)
    ids = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=sel.device) < counts[..., None]
    selection = KeyBlockSelection(blocks=torch.where(valid, ids, torch.zeros_like(ids)), valid=valid)
    geometry = SparseGeometry.build(
        num_queries + front, num_keys, block_size, block_size, sinks=0, window=0, lookahead=0, device=sel.device
    )
    return selection, geometry
