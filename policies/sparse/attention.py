"""The block-sparse layer's entry points: attention over a block grid, over a key-block selection.

`block_sparse_attention` computes a block grid (`grid.py`) with one of two back-ends with one
meaning, chosen by `backend`:
- `"eager"` (`eager.py`): gathered cells, batched by row width; exact, every device, the reference.
- `"flex"` (`flex.py`): `flex_attention` with a `BlockMask`, compiled (inductor on CPU, Triton on CUDA).
- `"auto"`: eager on CPU (faster there); elsewhere flex while it compiles, else eager. If compiling
  fails, the failure is remembered for the device type and eager is used from then on.

`key_block_attention` (from `gather.py`) computes a key-block selection (`selection.py`) with the
PyTorch back-ends (`"fast"`, `"reference"`); `triton_backend()` returns the CUDA back-end with the same
meaning (`triton_attention.py`), or None where Triton is not installed. Triton is imported only
then: the CPU install may lack it. A caller that runs the Triton back-end decides what a failure
means for it (HiP falls back to `"fast"`, as it does for its own Triton search kernel).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Literal

import torch

from kvmux.policies.sparse.eager import eager_attention
from kvmux.policies.sparse.flex import flex_block_attention, flex_state
from kvmux.policies.sparse.gather import key_block_attention
from kvmux.policies.sparse.grid import normalize_blocks

__all__ = ["Backend", "block_sparse_attention", "key_block_attention", "triton_backend"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "eager", "flex"]


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: torch.Tensor,
    block_size: int,
    scaling: float,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Exact causal attention restricted to the cells of a block grid.

    query [B, Hq, Tq, D] (the last Tq positions), key/value [B, Hkv, Tk, D] (Hq % Hkv == 0, not
    repeated), blocks bool [B|1, Hq|1, nqb, nkb] on the absolute block grid (see `grid.py`).
    Returns [B, Tq, Hq, D], the layout of `dense.sdpa`.
    """
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than keys ({tk})")
    sel = normalize_blocks(blocks.to(query.device), b, hq, tq, tk, block_size)
    if backend == "auto":
        device_type = query.device.type
        backend = "flex" if device_type != "cpu" and flex_state(device_type).usable else "eager"
    if backend == "flex":
        try:
            return flex_block_attention(query, key, value, sel, block_size, scaling)
        except Exception as err:  # compile or kernel failure: fall back, remember for the device
            state = flex_state(query.device.type)
            if not state.usable:
                raise
            state.usable = False
            log.warning("flex_attention unusable on %s (%s); using the eager block-sparse path", query.device, err)
    elif backend != "eager":
        raise ValueError(f"unknown backend {backend!r}")
    return eager_attention(query, key, value, sel, block_size, scaling)


@functools.cache
def triton_backend() -> ModuleType | None:
    """The key-block selection's Triton back-end (`triton_attention`), or None where Triton is not installed."""
    try:
        from kvmux.policies.sparse import triton_attention
    except ImportError:
        return None
    return triton_attention
