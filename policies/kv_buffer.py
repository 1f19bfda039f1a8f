"""KV cache layers that append without copying the whole cache every token.

transformers' `DynamicLayer` appends with `torch.cat`, so every decode step copies every layer's
keys and values: at 8K tokens that copy moves as many bytes as the step's attention reads.
`GrowableLayer` keeps keys and values in preallocated buffers [B, H, capacity, D] and exposes the
filled part as views (`layer.keys`, `layer.values`), so appending one token writes one row.
When a buffer is full it is reallocated with room to spare (`GROWTH` of the length, at least
`MIN_SPARE_TOKENS`), so the copies are amortised to a constant per token, as in vLLM's and
transformers' static layouts but without reserving the whole context up front.

Assigning `layer.keys = tensor` (what eviction policies do) adopts the tensor as the new buffer;
assigning a prefix view of the current buffer (what a rollback does) only shortens the length.
`GrowableCache` is a `DynamicCache` whose full-attention layers are growable (sliding-window
layers keep transformers' own type).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROWTH = 0.25  # spare room added when a buffer is reallocated, as a fraction of the needed length
MIN_SPARE_TOKENS = 256


def capacity_for(needed: int) -> int:
    """Buffer length for `needed` positions: room to spare, rounded to MIN_SPARE_TOKENS."""
    spare = max(MIN_SPARE_TOKENS, int(needed * GROWTH))
    return -(-(needed + spare) // MIN_SPARE_TOKENS) * MIN_SPARE_TOKENS


class _Buffer:
    """One preallocated tensor [B, H, capacity, D] and how many positions of it are filled."""

    __slots__ = ("data", "length")

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[..., : self.length, :]

    def assign(self, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            self.data, self.length = None, 0
        elif self._is_prefix_of_data(tensor):
            self.length = tensor.shape[-2]
        else:
            self.data, self.length = tensor, tensor.shape[-2]

    def _is_prefix_of_data(self, tensor: torch.Tensor) -> bool:
        data = self.data
        return (
            data is not None
            and tensor.data_ptr() == data.data_ptr()
            and tensor.stride() == data.stride()
            and tensor.shape[:-2] == data.shape[:-2]
            and tensor.shape[-1] == data.shape[-1]
            and tensor.shape[-2] <= data.shape[-2]
        )

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Write `new` [B, H, n, D] after the filled part; returns the filled view."""
        n = new.shape[-2]
        needed = self.length + n
        data = self.data
        if data is None or needed > data.shape[-2] or data.shape[:-2] != new.shape[:-2] or data.dtype != new.dtype:
            grown = new.new_empty((*new.shape[:-2], capacity_for(needed), new.shape[-1]))
            if data is not None and self.length:
                grown[..., : self.length, :] = data[..., : self.length, :]
            self.data = data = grown
        data[..., self.length : needed, :] = new
        self.length = needed
        return data[..., :needed, :]


class BufferedLayer(DynamicLayer):
    """Base of kvmux's cache layers that manage their own buffers: initialised by the first update."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True


class GrowableLayer(BufferedLayer):
    """A full-attention cache layer whose keys/values live in growable buffers (see module doc)."""

    def __init__(self, **kwargs) -> None:
        self._key_buffer = _Buffer()
        self._value_buffer = _Buffer()
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._key_buffer.view()

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_buffer.assign(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._value_buffer.view()

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buffer.assign(tensor)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._key_buffer.append(key_states), self._value_buffer.append(value_states)

    def get_seq_length(self) -> int:
        return self._key_buffer.length

    def reserved_bytes(self) -> int:
        """Bytes the buffers hold, filled or not."""
        return sum(
            b.data.numel() * b.data.element_size() for b in (self._key_buffer, self._value_buffer) if b.data is not None
        )


class GrowableCache(DynamicCache):
    """`DynamicCache` with growable full-attention layers."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        if config is None or not self.layers:
            self.layer_class_to_replicate = GrowableLayer
        else:
            self.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
