"""One calibration prompt: greedy decoding with dense attention, recording each head's copy events.

Retrieval Heads (Wu et al., 2024, https://arxiv.org/abs/2404.15574, §2): while the model generates
token w, a head copies and pastes when w is a needle token and the position the head attends most
(argmax of its attention over everything it sees) is a needle position holding w. A head's retrieval
score on a prompt is the share of the needle's tokens it copied this way, |g_h ∩ k| / |k|; here the
needle tokens k are the value's (what the answer copies), counted by position.

The attention that produces w is that of the forward whose logits w is sampled from (the last
prompt token's for the first generated token), so every forward records, per layer and query head,
the argmax of its last query row; the scores need no softmax or scaling for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.base import AttentionCall, PolicySession, SessionRequest, run_prefill
from kvmux.policies.dense import dense_attention
from kvmux.policies.registry import get_policy


class CopyProbeSession(PolicySession):
    """Dense attention that keeps, per layer, the most attended key of each query head's last row."""

    def __init__(self, info) -> None:
        full = get_policy("full")
        super().__init__(full, full.Params(), info, SessionRequest())
        self.top: list[torch.Tensor | None] = [None] * info.num_layers

    def attention(self, call: AttentionCall) -> torch.Tensor:
        query, key = call.query[0, :, -1], call.key[0]  # [Hq, D], [Hkv, T, D]
        hkv, groups = key.shape[0], call.num_kv_groups
        scores = torch.matmul(query.float().view(hkv, groups, -1), key.float().transpose(-1, -2))
        self.top[call.layer_idx] = scores.reshape(query.shape[0], -1).argmax(-1)
        return dense_attention(call)

    def tops(self) -> torch.Tensor:
        """long [layers, Hq]: the most attended position of every head in the last forward."""
        return torch.stack(self.top)


@dataclass
class CopyResult:
    copied: torch.Tensor  # bool [layers, Hq, V]: head copied value token v at least once
    generated: list[int]

    def scores(self) -> torch.Tensor:
        """fp32 [layers, Hq]: the share of the value's tokens each head copied."""
        return self.copied.float().mean(-1)


def copy_events(tops: torch.Tensor, token: int, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """bool [layers, Hq, V]: heads whose top position is value position v holding the generated `token`."""
    holds = ids[positions] == token  # [V]
    return (tops[..., None] == positions) & holds


def probe_prompt(runner, info, ids: list[int], value_positions: tuple[int, ...], steps: int = 0) -> CopyResult:
    """Prefill `ids`, decode `steps` greedy tokens (default: the value's tokens + 2, for a leading space and
    the closing period), and record every head's copy events."""
    steps = steps or len(value_positions) + 2
    session = CopyProbeSession(info)
    prompt = torch.tensor(ids)
    positions = torch.tensor(value_positions)
    copied = torch.zeros(info.num_layers, info.num_heads, len(value_positions), dtype=torch.bool)
    generated: list[int] = []
    try:
        logits = run_prefill(session, runner, prompt[None].to(info.device))
        for step in range(steps):
            token = int(logits.argmax())
            generated.append(token)
            copied |= copy_events(session.tops().cpu(), token, prompt, positions)
            if step + 1 < steps:
                logits = session.decode(runner, token)
    finally:
        session.close()
    return CopyResult(copied, generated)
