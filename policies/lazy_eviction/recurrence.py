"""LazyEviction's per-token recurrence record and score (arXiv 2506.15969; the algorithm: `policy.py`).

Per layer, token and query head: TS, the last step the token was attended with probability
>= alpha, and MRI, its maximum recurrence interval (the longest gap between two such steps).
Both are int32 (the reference keeps them in fp16). The score I = H1 + H2 follows the reference
code's formulas.
"""

from __future__ import annotations

import torch

from kvmux.policies.lazy_eviction.eviction import gather_tokens


class RecurrenceState:
    """TS and MRI (int32, [Hq, L]) for the tokens of one layer, in cache order."""

    def __init__(self, num_heads: int, device: torch.device):
        self.ts = torch.zeros(num_heads, 0, dtype=torch.int32, device=device)
        self.mri = torch.zeros(num_heads, 0, dtype=torch.int32, device=device)

    @property
    def length(self) -> int:
        return self.ts.shape[1]

    def append(self, arrival_ts: torch.Tensor) -> None:
        """Add tokens whose initial TS is `arrival_ts` [n] (MRI 0)."""
        new = arrival_ts.to(torch.int32)[None, :].expand(self.ts.shape[0], -1)
        self.ts = torch.cat([self.ts, new], dim=1)
        self.mri = torch.cat([self.mri, torch.zeros_like(new)], dim=1)

    def record(self, active: torch.Tensor, first_step: int) -> None:
        """Apply steps first_step .. first_step+R-1 with `active` bool [Hq, L, R] (attended >= alpha)."""
        self.ts, self.mri = record_steps(self.ts, self.mri, active, first_step)

    def keep(self, index: torch.Tensor) -> None:
        """Keep tokens `index` [Hkv, K] of each KV head (query heads follow their KV head)."""
        self.ts, self.mri = gather_tokens(self.ts, index), gather_tokens(self.mri, index)


def record_steps(
    ts: torch.Tensor, mri: torch.Tensor, active: torch.Tensor, first_step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's update for R consecutive steps at once: at step s, every token attended
    >= alpha gets MRI = max(MRI, s - TS) and TS = s. ts/mri [H, L]; active bool [H, L, R]."""
    if active.shape[2] == 1:
        hit = active[..., 0]
        gap = torch.where(hit, first_step - ts, 0)
        return torch.where(hit, first_step, ts), torch.maximum(mri, gap)
    steps = torch.arange(first_step, first_step + active.shape[2], dtype=ts.dtype, device=ts.device)
    # last activation at or before each step (TS itself when none yet; TS < every later step)
    latest = torch.cummax(torch.where(active, steps, ts[:, :, None]), dim=2).values
    inner = torch.where(active[..., 1:], steps[1:] - latest[..., :-1], 0).amax(dim=2)
    first = torch.where(active[..., 0], first_step - ts, 0)
    return latest[..., -1].contiguous(), torch.maximum(mri, torch.maximum(inner, first))


def recurrence_score(ts: torch.Tensor, mri: torch.Tensor, step: int) -> torch.Tensor:
    """I = H1 + H2 per token and query head (fp32), the reference code's formulas."""
    period = mri.float()
    h1 = 2.0 * torch.sigmoid(-1.0 - (step - ts).float() / (period + 1e-5))
    h2 = torch.where(mri > 0, 2.0 * torch.sigmoid(1.0 - period), torch.zeros_like(period))
    return h1 + h2
