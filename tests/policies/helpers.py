"""Helpers for policy tests: run a session over ids and collect logits."""

from __future__ import annotations

import torch

from kvmux.policies.base import SessionRequest
from kvmux.policies.base import run_prefill as run_prefill  # the tests' one way to prefill
from kvmux.policies.registry import get_policy


def new_session(name: str, info, request: SessionRequest | None = None, **params):
    policy = get_policy(name)
    return policy.new_session(policy.Params(**params), info, request or SessionRequest())


def stepwise_logits(session, runner, ids: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """Feed ids [1, T] in chunks through the session; logits of every position [T, V]."""
    out = [runner.forward(session, ids[:, s : s + chunk], all_logits=True)[0] for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, dim=0)


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Reference: one dense forward without any session [T, V]."""
    with torch.inference_mode():
        return model(ids).logits[0].float()


class ByteTokenizer:
    """One token per UTF-8 byte: matches the tiny models' 256-token vocabulary."""

    all_special_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, **kwargs) -> str:
        return bytes(ids).decode("utf-8", errors="replace")
