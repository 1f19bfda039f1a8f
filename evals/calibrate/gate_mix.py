"""DuoAttention's head gate on a policy session: out = sparse + g · (dense − sparse), per layer and query head.

DuoAttention (Xiao et al., 2024, https://arxiv.org/abs/2410.10819, §3.2) mixes every head between full and
compressed attention by a gate g. `gate_session` installs that mix on one sparse session while autograd is
on, so the gate gains of `gates.py` are its gradient at g = 0.
"""

from __future__ import annotations

import torch

from kvmux.policies.base import PolicySession
from kvmux.policies.dense import dense_attention


def gate_session(session: PolicySession, gates: torch.Tensor) -> None:
    """Mix the session's attention toward dense by `gates` [layers, Hq] whenever autograd is on, and run
    its block search without autograd (set on this session only)."""
    attention, select = session.attention, session.select

    def gated(call):
        out = attention(call)
        if not torch.is_grad_enabled():
            return out
        return out + gates[call.layer_idx].view(1, 1, -1, 1) * (dense_attention(call) - out)

    def search(*args, **kwargs):
        with torch.no_grad():
            return select(*args, **kwargs)

    session.attention, session.select = gated, search
