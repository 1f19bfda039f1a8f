"""StreamingLLM's cache layer: attention sinks + a window kept as a ring, so decoding copies nothing.

StreamingLLM (arXiv 2309.17453) keeps the first `sinks` tokens and the last `window` tokens. Evicting
by concatenation copies the whole window every token. This layer keeps sinks and window in one
buffer: while decoding one token at a time, the window part of the buffer (window + 1 slots) is a
ring - evicting the oldest token only marks its slot dead, and the next token is written there. A
decode step attends every live slot, and with one query the order of keys does not matter, so the
attention sees exactly the keys the concatenating layout holds. Before any longer forward (a prompt
chunk, whose causal mask needs keys in order) the buffer is put back in order, and a forward that
overflows the window is compacted once (one copy of the window per chunk).

`slot_positions()` gives each physical slot its place in the logical order (sinks first, then the
window from oldest to newest), which the cache-position mode uses to rotate keys to their slot.
When `inv_freq` is given, keys are stored un-rotated: they arrive rotated at their logical slot and
are rotated back once. `version` changes whenever live tokens change slots (a reordering, a compaction,
a restore or a load; appending moves none) and `last_slot` is where the latest one-token update went, so
a per-slot copy of the buffer (`streaming_decode.py`) knows when it can be updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.kv_buffer import BufferedLayer, capacity_for
from kvmux.policies.rope import rotate


@dataclass(slots=True)
class _State:
    keys: torch.Tensor | None = None  # [B, H, capacity, D] physical buffer
    values: torch.Tensor | None = None
    length: int = 0  # physical slots in use (live + the dead one)
    oldest: int = 0  # physical slot of the oldest window token (ring mode)
    dead: int | None = None  # physical slot of the evicted token, written next; None: slots are in order


class SinkWindowLayer(BufferedLayer):
    """Keys/values of one layer: `sinks` first tokens + the last `window` tokens (see module doc)."""

    def __init__(self, sinks: int, window: int, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sinks, self.window, self.inv_freq = sinks, window, inv_freq
        self.state = _State()
        self.version = 0  # bumped whenever live tokens change slots
        self.last_slot = -1  # physical slot of the latest one-token update

    # -- what callers read -------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.state.length - (self.state.dead is not None)

    @property
    def keys(self) -> torch.Tensor | None:  # live keys in logical order (a copy in ring mode)
        return self._ordered(self.state.keys)

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            raise ValueError("SinkWindowLayer manages its own buffer")

    @property
    def values(self) -> torch.Tensor | None:
        return self._ordered(self.state.values)

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            raise ValueError("SinkWindowLayer manages its own buffer")

    def slot_positions(self, device: torch.device) -> torch.Tensor:
        """Logical slot of every physical slot in use: int64 [length]."""
        st = self.state
        slots = torch.arange(st.length, device=device)
        if st.oldest == self.sinks:  # in order
            return slots
        ring = st.length - self.sinks
        slots[self.sinks :] = self.sinks + (slots[self.sinks :] - st.oldest) % ring
        return slots

    # -- cache protocol ----------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st, n = self.state, key_states.shape[-2]
        if self.inv_freq is not None:  # un-rotate from the logical slots the model rotated them to
            start = self.get_seq_length()
            key_states = rotate(key_states, -torch.arange(start, start + n, device=key_states.device), self.inv_freq)
        if st.dead is not None and n == 1:
            st.keys[..., st.dead : st.dead + 1, :] = key_states
            st.values[..., st.dead : st.dead + 1, :] = value_states
            self.last_slot, st.dead = st.dead, None  # every slot is live; `oldest` still marks where the ring starts
            return st.keys[..., : st.length, :], st.values[..., : st.length, :]
        self._put_in_order()
        needed = st.length + n
        if st.keys is None or needed > st.keys.shape[-2]:
            st.keys = _grown(st.keys, st.length, key_states, needed)
            st.values = _grown(st.values, st.length, value_states, needed)
        st.keys[..., st.length : needed, :] = key_states
        st.values[..., st.length : needed, :] = value_states
        st.length, st.oldest, self.last_slot = needed, self.sinks, needed - 1
        return st.keys[..., :needed, :], st.values[..., :needed, :]

    def evict(self, window: int | None = None) -> None:
        """Drop tokens between the sinks and the last `window` (default: the layer's; called between forwards,
        with a smaller window to make room for the next forward's tokens)."""
        st = self.state
        window = self.window if window is None else window
        live, keep = self.get_seq_length(), self.sinks + window
        if live <= keep:
            return
        ring = st.length - self.sinks
        if live == keep + 1 and ring == window + 1:  # one token over: its slot becomes the dead one
            st.dead = st.oldest
            st.oldest = self.sinks + (st.oldest - self.sinks + 1) % ring
            return
        self._put_in_order()
        drop = st.length - keep
        for buffer in (st.keys, st.values):
            buffer[..., self.sinks : keep, :] = buffer[..., self.sinks + drop : st.length, :].clone()
        st.length, st.oldest = keep, self.sinks
        self.version += 1

    # -- checkpoints (an undone decode step) -------------------------------------------------------
    def snapshot(self) -> _State:
        st = self.state
        return _State(st.keys, st.values, st.length, st.oldest, st.dead)

    def restore(self, snapshot: _State) -> None:
        self.state = _State(snapshot.keys, snapshot.values, snapshot.length, snapshot.oldest, snapshot.dead)
        self.version += 1

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Adopt a copy of live keys/values in logical order, as stored (the prefix cache's import)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        n = keys.shape[-2]
        st = self.state = _State()
        st.keys, st.values = _grown(None, 0, keys, n), _grown(None, 0, values, n)
        st.keys[..., :n, :], st.values[..., :n, :] = keys, values
        st.length, st.oldest = n, self.sinks
        self.version += 1

    # -- helpers -----------------------------------------------------------------------------------
    def _order(self, device: torch.device) -> torch.Tensor:
        """Physical slots of the live tokens in logical order."""
        st = self.state
        ring = st.length - self.sinks
        window = self.sinks + (torch.arange(ring, device=device) + st.oldest - self.sinks) % ring
        if st.dead is not None:
            window = window[: ring - 1]
        return torch.cat([torch.arange(self.sinks, device=device), window])

    def _ordered(self, buffer: torch.Tensor | None) -> torch.Tensor | None:
        st = self.state
        if buffer is None:
            return None
        if st.dead is None and st.oldest == self.sinks:
            return buffer[..., : st.length, :]
        return buffer.index_select(-2, self._order(buffer.device))

    def _put_in_order(self) -> None:
        st = self.state
        if st.keys is None or (st.dead is None and st.oldest == self.sinks):
            st.dead, st.oldest = None, self.sinks
            return
        keys, values = self._ordered(st.keys), self._ordered(st.values)
        st.keys[..., : keys.shape[-2], :] = keys
        st.values[..., : values.shape[-2], :] = values
        st.length, st.oldest, st.dead = keys.shape[-2], self.sinks, None
        self.version += 1


def _grown(buffer: torch.Tensor | None, length: int, new: torch.Tensor, needed: int) -> torch.Tensor:
    grown = new.new_empty((*new.shape[:-2], capacity_for(needed), new.shape[-1]))
    if buffer is not None and length:
        grown[..., :length, :] = buffer[..., :length, :]
    return grown
