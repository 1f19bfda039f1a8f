"""A request's prefill through the prefix cache: restore the longest cached prefix, prefill the rest,
offer the new state back.

The policy decides what may be reused (`Policy.prefix_reuse`, see `kvmux.policies.prefix`); this
module only applies its declaration:
- lookup: the longest cached prefix for the request's configuration key that leaves at least
  `min_tail` prompt tokens to prefill, a multiple of the policy's granularity;
- offer, truncatable states: once the prompt is read, the state after the longest multiple of the
  granularity (later requests may use any shorter multiple of it);
- offer, other states: taken between prefill forwards when the session has seen exactly the longest
  multiple of the granularity that leaves `min_tail` tokens (a chunk boundary: the policies that
  declare such states prefill in chunks of their granularity).
A failure to export or store a state is logged and the request goes on: the cache is an optimisation.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass

import torch

from kvmux.models.info import ModelInfo
from kvmux.policies.base import PolicySession, Runner
from kvmux.policies.prefix import PrefixReuse
from kvmux.policies.presets import Preset
from kvmux.server.prefix_cache import PrefixCache

log = logging.getLogger("kvmux.prefix_cache")


def config_key(info: ModelInfo, preset: Preset, chunk: int) -> str:
    """What makes two sessions' states interchangeable: the model, the policy and every parameter value
    (not the preset's name: two presets with the same parameters share entries), the prefill chunk and dtype."""
    params = preset.params.model_dump_json()
    return f"{info.root}|{info.dtype}|{info.device.type}|chunk={chunk}|{preset.policy.name}|{params}"


@dataclass
class PrefixPlan:
    reuse: PrefixReuse
    key: str
    label: str
    start: int = 0  # prompt tokens restored from the cache
    snapshot_at: int = 0  # offer the state once the session has seen this many tokens (0: never)
    stored: bool = False


def plan_prefix(
    cache: PrefixCache | None, session: PolicySession, preset: Preset, runner: Runner, ids: list[int]
) -> PrefixPlan | None:
    """Look the prompt up and start `session` from the longest cached prefix; None when the policy shares
    nothing (or there is no cache)."""
    if cache is None or cache.capacity_bytes <= 0:
        return None
    chunk = runner.prefill_chunk_tokens
    reuse = preset.policy.prefix_reuse(preset.params, session.info, chunk)
    if reuse is None:
        return None
    plan = PrefixPlan(reuse, config_key(session.info, preset, chunk), preset.policy.name)
    hit = cache.lookup(plan.key, plan.label, ids, max_length=len(ids) - reuse.min_tail)
    if hit is not None:
        try:
            session.import_prefix(hit.entry.state, hit.length)
            plan.start = hit.length
        finally:
            cache.release(hit)
    target = reuse.snapshot_length(len(ids))
    if target > plan.start and target >= cache.block_tokens:
        plan.snapshot_at = target
    return plan


def prefill_with_prefix(
    session: PolicySession, runner: Runner, ids: list[int], plan: PrefixPlan | None, cache: PrefixCache | None
) -> Generator[None, None, torch.Tensor]:
    """The session's prefill of the prompt after the restored prefix; yields between forwards, offers the
    state to the cache where the plan says; returns the last logits [vocab]."""
    start = plan.start if plan is not None else 0
    tensor = torch.tensor([ids[start:]], device=session.info.device)
    steps = session.prefill(runner, tensor)
    try:
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                logits = stop.value
                break
            if plan is not None and not plan.reuse.truncatable and session.tokens_seen == plan.snapshot_at:
                _offer(cache, session, ids, plan)
            yield
    finally:
        steps.close()
    if plan is not None and plan.reuse.truncatable and plan.snapshot_at:
        _offer(cache, session, ids, plan)
    return logits


def _offer(cache: PrefixCache | None, session: PolicySession, ids: list[int], plan: PrefixPlan) -> None:
    if cache is None or plan.stored:
        return
    plan.stored = True
    length = plan.snapshot_at
    try:
        state = session.export_prefix(length)
        cache.offer(
            plan.key,
            plan.label,
            ids[:length],
            state,
            state.nbytes,
            truncatable=plan.reuse.truncatable,
            granularity=plan.reuse.granularity,
        )
    except Exception:  # noqa: BLE001 - the cache is an optimisation: the request goes on without it
        log.exception("could not cache the state after %d prompt tokens (%s)", length, plan.label)
