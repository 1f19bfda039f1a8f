"""The key-block selection form: per (query head, query block) a list of key-block ids, plus sinks and a window.

A `KeyBlockSelection` names, for every (batch, query head, query block), up to K key blocks by id
(block j covers key tokens [j*b_k, (j+1)*b_k)); the key block size b_k is independent of the query
block size b_q and may be as small as one token. A `SparseGeometry` places the query blocks of one
attention call and says what every query attends besides its selected blocks: the `sinks` first
tokens and its own last `window` tokens. Attention over a selection is one softmax over the union,
each key once, causal (`gather.py`, `triton_attention.py`).

The geometry also holds each query block's candidate range [lo, hi): the key blocks that are neither
all sinks nor all inside the block's window, i.e. the blocks a selection is drawn from (HiP's search,
arXiv 2406.09827, splits this range). Selecting every candidate gives dense causal attention.

A block grid (`grid.py`) is the special case b_q = b_k, no sinks, no window (`grid.grid_as_selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# working set of one slice of query blocks, per device type: the selection's PyTorch attention (and
# HiP's search) process query blocks in slices of about this many bytes (at least one block)
SLICE_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}
DEFAULT_SLICE_BYTES = 64 << 20


def slice_bytes(device_type: str) -> int:
    """Bytes one slice of query blocks may use on a device type."""
    return SLICE_BYTES.get(device_type, DEFAULT_SLICE_BYTES)


@dataclass(frozen=True, slots=True)
class KeyBlockSelection:
    """The key blocks selected per (batch, query head, query block), as block ids."""

    blocks: torch.Tensor  # int64 [B, Hq, nQB, K] key-block ids (block j covers tokens j*b_k .. j*b_k+b_k-1)
    valid: torch.Tensor  # bool [B, Hq, nQB, K]; False where an entry is padding (valid ids of a row are distinct)
    rounds: int = 0  # search rounds that produced it (HiP's branch-and-prune; 0 otherwise)

    @classmethod
    def from_unordered(cls, blocks: torch.Tensor, valid: torch.Tensor, rounds: int = 0) -> KeyBlockSelection:
        """A selection from ids and validity in any order: valid ids ascending, then the padding (id 0)."""
        blocks = torch.where(valid, blocks, torch.zeros_like(blocks))
        order = torch.where(valid, blocks, torch.full_like(blocks, torch.iinfo(torch.int64).max)).argsort(dim=-1)
        return cls(blocks=blocks.gather(-1, order), valid=valid.gather(-1, order), rounds=rounds)


def last_query_candidates(num_keys: int, block_k: int, sinks: int, window: int, lookahead: int) -> tuple[int, int]:
    """The candidate key blocks [lo, hi) of the query at position num_keys - 1, on the host: what
    `SparseGeometry.build` computes for the last query block (a decode row's only one)."""
    lo = sinks // block_k
    end = min(num_keys - window + lookahead, num_keys)  # exclusive token limit
    return lo, max(-(-end // block_k), lo)


@dataclass(frozen=True, slots=True)
class SparseGeometry:
    """Where each query block of one attention call sits, what it always attends, and its candidate blocks.

    Queries are the last `num_queries` of `num_keys` positions (bottom-right causal). They are cut
    into blocks of `block_q` from the first query; the last block is padded by repeating the last
    query. The candidate key blocks of a block are [lo, hi): from `floor(sinks / b_k)` to the block
    holding token `last query - window + lookahead` (sinks and window are attended anyway).
    """

    block_q: int
    block_k: int
    sinks: int
    window: int
    num_queries: int
    num_keys: int
    positions: torch.Tensor  # int64 [nQB * b_q]: absolute position of every (padded) query row
    lo: torch.Tensor  # int64 [nQB]
    hi: torch.Tensor  # int64 [nQB]
    max_candidates: int  # max(hi - lo), known on the host (the last query block's range)

    @classmethod
    def build(
        cls,
        num_queries: int,
        num_keys: int,
        block_q: int,
        block_k: int,
        sinks: int,
        window: int,
        lookahead: int,
        device: torch.device,
    ) -> SparseGeometry:
        num_blocks = -(-num_queries // block_q)
        rows = torch.arange(num_blocks * block_q, device=device).clamp(max=num_queries - 1)
        positions = num_keys - num_queries + rows
        last = positions.view(num_blocks, block_q)[:, -1]
        end = (last + 1 - window + lookahead).clamp(max=num_keys)  # exclusive token limit
        lo = torch.full((num_blocks,), sinks // block_k, dtype=torch.int64, device=device)
        hi = torch.maximum(torch.div(end + block_k - 1, block_k, rounding_mode="floor"), lo)
        last_lo, last_hi = last_query_candidates(num_keys, block_k, sinks, window, lookahead)
        return cls(block_q, block_k, sinks, window, num_queries, num_keys, positions, lo, hi, last_hi - last_lo)

    @property
    def num_blocks(self) -> int:
        return self.lo.shape[0]

    def query_blocks(self, query: torch.Tensor) -> torch.Tensor:
        """[B, H, Tq, D] -> [B, H, nQB, b_q, D], the last block padded with the last query."""
        b, h, tq, d = query.shape
        pad = self.num_blocks * self.block_q - tq
        if pad:
            query = torch.cat([query, query[:, :, -1:].expand(b, h, pad, d)], dim=2)
        return query.view(b, h, self.num_blocks, self.block_q, d)
