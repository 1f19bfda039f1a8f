"""A deliberately faulty KV policy: full attention that raises where its parameters say.

Used by the fault-isolation tests and by the soak run (`scripts/soak.py --faulty-fraction`, which
loads `tests.faulty_plugin` through the server's `policy_modules`). It is not registered on import:
tests register it for their duration only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvmux.policies.base import AttentionCall, KVStats, Policy, PolicyParams, PolicySession


class InjectedFault(RuntimeError):
    """The failure a faulty session raises on purpose."""


class FaultyParams(PolicyParams):
    fail_in: Literal["prefill", "decode", "after_decode", "stats", "close", "never"] = Field(
        "decode", description="where the session raises"
    )
    fail_after: int = Field(2, ge=0, le=1000, description="decode steps that succeed before a decode fault")
    fail_layer: int = Field(1, ge=0, description="layer whose attention raises (later layers never run)")


class FaultySession(PolicySession):
    params: FaultyParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefilled = False
        self.decode_steps = 0

    def _due(self, where: str) -> bool:
        return self.params.fail_in == where and self.decode_steps >= self.params.fail_after

    def attention(self, call: AttentionCall):
        if call.layer_idx == self.params.fail_layer:
            if self.params.fail_in == "prefill" and not self.prefilled:
                raise InjectedFault("injected prefill fault")
            if self.prefilled and self._due("decode"):
                raise InjectedFault(f"injected decode fault at step {self.decode_steps}")
        return super().attention(call)

    def prefill(self, runner, input_ids):
        logits = yield from super().prefill(runner, input_ids)
        self.prefilled = True
        return logits

    def after_forward(self, num_tokens: int) -> None:
        if not self.prefilled:
            return
        if self._due("after_decode"):
            raise InjectedFault(f"injected after-forward fault at step {self.decode_steps}")
        self.decode_steps += 1

    def stats(self) -> KVStats:
        if self.params.fail_in == "stats":
            raise InjectedFault("injected stats fault")
        return super().stats()

    def close(self) -> None:
        super().close()
        if self.params.fail_in == "close" and self.prefilled:
            raise InjectedFault("injected close fault")


class FaultyPolicy(Policy):
    name = "faulty"
    Params = FaultyParams
    session_class = FaultySession
    batched_decode = True
    summary = "full attention that fails on purpose (fault-isolation tests)"
