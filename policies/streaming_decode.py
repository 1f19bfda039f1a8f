"""StreamingLLM's cache-position decode step without re-rotating the cache (arXiv 2309.17453).

In `positions: cache` mode the paper gives the cached keys their slot indices 0..L-1 and the query
slot L-1, so a key in slot j sits L-1-j positions before the query. Re-rotating all L keys to their
slots costs a pass over the cache per layer and step. With one query row only those distances matter,
and a RoPE score depends only on the difference of the two angles, so the query may be rotated to
any position t as long as each key in slot j is rotated to t-(L-1)+j. With t the token's index in
the stream, a window key keeps its position as the window slides (it moves down one slot while t moves
up one; while the window fills, L grows with t), so it is rotated once, when it arrives. Only the sink
slots (fixed, while t grows) and the new token are rotated in a step, and the query once.

`RotatedKeys` keeps, per layer, a copy of the layer's physical buffer with keys rotated that way, and
rebuilds it in full (one rotation, what every step cost before) unless exactly one token arrived since
its last step and no slot moved: after a prefill chunk (several tokens), a compaction, a grown buffer (a
new shape), a restored checkpoint or an imported state (a new `version`). Angles are
computed in float64, as stream indices grow without bound. The copy holds one more set of keys per
layer: the policy's memory estimate counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.rope import exact_cos_sin, rotate_with
from kvmux.policies.sink_window_cache import SinkWindowLayer


@dataclass(slots=True)
class _Mirror:
    keys: torch.Tensor  # [B, H, capacity, D]: physical slots, rotated to t-(L-1)+slot
    version: int  # the layer's slot layout it mirrors
    step: int  # the stream index t it was last brought to


@dataclass(slots=True)
class _StepTables:
    step: int
    length: int
    rows: torch.Tensor  # physical slots rotated this step: the sinks and the new token
    rows_cos: torch.Tensor
    rows_sin: torch.Tensor
    query_cos: torch.Tensor
    query_sin: torch.Tensor


class RotatedKeys:
    """Per-layer rotated copies of a StreamingLLM session's cache for its decode steps (module doc)."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self.mirrors: dict[int, _Mirror] = {}
        self.tables: _StepTables | None = None

    def decode_inputs(
        self, layer: SinkWindowLayer, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query rotated to `step`, keys rotated to step-(L-1)+slot) for a one-row query whose model
        rotation put it at slot L-1; `keys` is the layer's buffer of L un-rotated keys."""
        length = keys.shape[-2]
        tables = self._tables(layer, step, length, keys.device)
        mirror = self.mirrors.get(layer_idx)
        buffer = layer.state.keys
        if (
            mirror is None
            or mirror.version != layer.version
            or mirror.step != step - 1
            or mirror.keys.shape != buffer.shape
        ):
            mirror = self._rebuild(layer, layer_idx, keys, step)
        else:
            rotated = rotate_with(keys.index_select(-2, tables.rows), tables.rows_cos, tables.rows_sin)
            mirror.keys.index_copy_(-2, tables.rows, rotated)
            mirror.step = step
        return rotate_with(query, tables.query_cos, tables.query_sin), mirror.keys[..., :length, :]

    def _tables(self, layer: SinkWindowLayer, step: int, length: int, device: torch.device) -> _StepTables:
        """The step's rotation tables, shared by every layer (all hold the same slots)."""
        t = self.tables
        if t is not None and t.step == step and t.length == length:
            return t
        shift = step - (length - 1)  # position of slot 0
        sinks = min(layer.sinks, length)
        rows = list(range(sinks))
        if layer.last_slot >= sinks:
            rows.append(layer.last_slot)
        rows_t = torch.tensor(rows, device=device)
        positions = torch.tensor([shift + r for r in range(sinks)] + ([step] if len(rows) > sinks else []))
        rows_cos, rows_sin = exact_cos_sin(positions.to(device), self.inv_freq)
        query_cos, query_sin = exact_cos_sin(torch.tensor([shift], device=device), self.inv_freq)
        self.tables = _StepTables(step, length, rows_t, rows_cos, rows_sin, query_cos, query_sin)
        return self.tables

    def _rebuild(self, layer: SinkWindowLayer, layer_idx: int, keys: torch.Tensor, step: int) -> _Mirror:
        length = keys.shape[-2]
        positions = layer.slot_positions(keys.device) + (step - (length - 1))
        cos, sin = exact_cos_sin(positions, self.inv_freq)
        mirror = self.mirrors.get(layer_idx)
        if mirror is None or mirror.keys.shape != layer.state.keys.shape:
            mirror = _Mirror(torch.empty_like(layer.state.keys), layer.version, step)
            self.mirrors[layer_idx] = mirror
        mirror.keys[..., :length, :] = rotate_with(keys, cos, sin)
        mirror.version, mirror.step = layer.version, step
        return mirror
