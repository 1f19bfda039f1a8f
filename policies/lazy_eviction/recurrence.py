"""LazyEviction's per-token recurrence record and score (arXiv 2506.15969; the algorithm: `policy.py`).

Per layer, token and query head: TS, the last step the token was attended with probability
>= alpha, and MRI, its maximum recurrence interval (the longest gap between two such steps).
Both are int32 (the reference keeps them in fp16). The score I = H1 + H2 follows the reference
code's formulas.

Decode steps are recorded in arrears: a step writes only its test p >= alpha into a bool buffer
of `pending_rows` rows, and TS/MRI catch up (`flush`) when the buffer is full or before anything
reads them, one step at a time in integer arithmetic (`record_step`),
so a decode step costs one comparison and no copy of the record.
"""

from __future__ import annotations

import torch

from kvmux.policies.kv_buffer import capacity_for
from kvmux.policies.lazy_eviction.eviction import gather_tokens

PENDING_ROWS = 8  # decode steps recorded in arrears (the buffer holds this many [Hq, L] bool rows)


class RecurrenceState:
    """TS and MRI (int32, [Hq, L]) for the tokens of one layer, in cache order.

    The TS/MRI tensors are replaced, never mutated in place, so `mark` (references plus the
    pending counts) is enough to `rewind` a decode step that failed part-way.
    """

    def __init__(self, num_heads: int, device: torch.device, pending_rows: int = PENDING_ROWS):
        self.num_heads, self.device = num_heads, device
        self._ts = torch.zeros(num_heads, 0, dtype=torch.int32, device=device)
        self._mri = torch.zeros(num_heads, 0, dtype=torch.int32, device=device)
        self._capacity_rows = pending_rows
        self._hits: torch.Tensor | None = None  # [rows, Hq, capacity] bool, False past each row's length
        self._rows = 0  # pending decode steps in `_hits`
        self._first_step = 0  # the step of pending row 0
        self._arrivals: list[int] = []  # TS of the tokens appended by pending steps, in order
        self.flushes = 0

    # -- the record -------------------------------------------------------------------------------
    @property
    def ts(self) -> torch.Tensor:
        self.flush()
        return self._ts

    @ts.setter
    def ts(self, value: torch.Tensor) -> None:
        self.flush()
        self._ts = value

    @property
    def mri(self) -> torch.Tensor:
        self.flush()
        return self._mri

    @mri.setter
    def mri(self, value: torch.Tensor) -> None:
        self.flush()
        self._mri = value

    @property
    def length(self) -> int:
        return self._ts.shape[1] + len(self._arrivals)

    @property
    def buffer_full(self) -> bool:
        return self._rows >= self._capacity_rows

    def append(self, arrival_ts: torch.Tensor) -> None:
        """Add tokens whose initial TS is `arrival_ts` [n] (MRI 0)."""
        self.flush()
        self._extend(arrival_ts)

    def _extend(self, arrival_ts: torch.Tensor) -> None:
        new = arrival_ts.to(torch.int32)[None, :].expand(self.num_heads, -1)
        self._ts = torch.cat([self._ts, new], dim=1)
        self._mri = torch.cat([self._mri, torch.zeros_like(new)], dim=1)

    def record(self, active: torch.Tensor, first_step: int) -> None:
        """Apply steps first_step .. first_step+R-1 with `active` bool [Hq, L, R] (attended >= alpha)."""
        self.flush()
        self._ts, self._mri = record_steps(self._ts, self._mri, active, first_step)

    def keep(self, index: torch.Tensor) -> None:
        """Keep tokens `index` [Hkv, K] of each KV head (query heads follow their KV head)."""
        self.flush()
        self._ts, self._mri = gather_tokens(self._ts, index), gather_tokens(self._mri, index)

    # -- decode steps in arrears ------------------------------------------------------------------
    def observe_step(self, probs: torch.Tensor, alpha: float, step: int) -> None:
        """Decode step `step`: its token arrives (TS = step - 1) and `probs` [Hq, L] (L counting that
        token) marks the tokens attended >= alpha. TS/MRI are updated at the next `flush`."""
        if self._rows and (self.buffer_full or step != self._first_step + self._rows):
            self.flush()
        self._arrivals.append(step - 1)
        length = self.length
        if probs.shape != (self.num_heads, length):
            raise ValueError(f"decode row of shape {tuple(probs.shape)} for {length} tokens")
        if self._hits is None or self._hits.shape[2] < length:
            self._grow(length)
        if not self._rows:
            self._first_step = step
        if torch.is_inference_mode_enabled():
            torch.ge(probs, alpha, out=self._hits[self._rows, :, :length])
        else:  # the buffer is an inference tensor when it was made during a forward
            with torch.inference_mode():
                torch.ge(probs, alpha, out=self._hits[self._rows, :, :length])
        self._rows += 1

    @torch.inference_mode()
    def _grow(self, length: int) -> None:
        capacity = capacity_for(length)  # room to spare, as the KV buffers grow: the copy is rare
        grown = torch.zeros(self._capacity_rows, self.num_heads, capacity, dtype=torch.bool, device=self.device)
        if self._hits is not None:
            grown[:, :, : self._hits.shape[2]] = self._hits
        self._hits = grown

    def flush(self) -> None:
        """Bring TS/MRI up to date with the pending decode steps."""
        if self._arrivals or self._rows:
            with torch.inference_mode():
                self._catch_up()

    def _catch_up(self) -> None:
        if self._arrivals:
            self._extend(torch.tensor(self._arrivals, dtype=torch.int32, device=self.device))
            self._arrivals = []
        if self._rows:
            length = self._ts.shape[1]
            for row in range(self._rows):  # one pass of cheap arithmetic per step (see `record_step`)
                hit = self._hits[row, :, :length]
                self._ts, self._mri = record_step(self._ts, self._mri, hit, self._first_step + row)
            self._hits[: self._rows].zero_()
            self._rows = 0
        self.flushes += 1

    def mark(self) -> tuple:
        """What `rewind` needs to undo the decode steps observed after this call."""
        return self._ts, self._mri, self._rows, len(self._arrivals), self.flushes

    @torch.inference_mode()
    def rewind(self, mark: tuple) -> None:
        ts, mri, rows, arrivals, flushes = mark
        if flushes != self.flushes:
            raise RuntimeError("the recurrence record was updated since the mark; the step cannot be undone")
        if self._hits is not None and self._rows > rows:
            self._hits[rows : self._rows].zero_()
        self._ts, self._mri, self._rows = ts, mri, rows
        del self._arrivals[arrivals:]


def record_steps(
    ts: torch.Tensor, mri: torch.Tensor, active: torch.Tensor, first_step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's update for R consecutive steps at once: at step s, every token attended
    >= alpha gets MRI = max(MRI, s - TS) and TS = s. ts/mri [H, L]; active bool [H, L, R]."""
    if active.shape[2] == 1:
        return record_step(ts, mri, active[..., 0], first_step)
    steps = torch.arange(first_step, first_step + active.shape[2], dtype=ts.dtype, device=ts.device)
    # last activation at or before each step (TS itself when none yet; TS < every later step)
    latest = torch.cummax(torch.where(active, steps, ts[:, :, None]), dim=2).values
    inner = torch.where(active[..., 1:], steps[1:] - latest[..., :-1], 0).amax(dim=2)
    first = torch.where(active[..., 0], first_step - ts, 0)
    return latest[..., -1].contiguous(), torch.maximum(mri, torch.maximum(inner, first))


def record_step(ts: torch.Tensor, mri: torch.Tensor, hit: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `record_steps` (hit bool [H, L]) in arithmetic: gap = (step - TS) where hit, else 0; then
    TS + gap and max(MRI, gap). Masked selects on CPU cost several times this product."""
    gap = (step - ts) * hit
    return ts + gap, torch.maximum(mri, gap)


def recurrence_score(ts: torch.Tensor, mri: torch.Tensor, step: int) -> torch.Tensor:
    """I = H1 + H2 per token and query head (fp32), the reference code's formulas."""
    period = mri.float()
    h1 = 2.0 * torch.sigmoid(-1.0 - (step - ts).float() / (period + 1e-5))
    h2 = torch.where(mri > 0, 2.0 * torch.sigmoid(1.0 - period), torch.zeros_like(period))
    return h1 + h2
