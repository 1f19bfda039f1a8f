"""Composed presets: one preset's prefill, then another preset's decode, in one request.

The policies act in different phases (FlexPrefill only speeds the prefill, LazyEviction only acts while
decoding, StreamingLLM and HiP act in both), so a request may pick the two separately: the prefill part's
session reads the whole prompt, its cache becomes the decode part's starting cache, and the decode part
generates (`session.py`). A pair is checked when the request's policy is resolved: the decode part must
accept the cache the prefill part leaves (`handover.py`), otherwise the request gets a 400 naming the
pair and the reason.

| prefill part \\ decode part | full, flexprefill, hip, lazy_eviction | streaming_llm | actqkv, infiniretri |
|---|---|---|---|
| full, flexprefill, hip, lazy_eviction | cache adopted as it is | first sinks + last window kept | refused |
| streaming_llm | what the ring kept, in order | ring re-windowed | refused |
| actqkv, infiniretri | refused | refused | refused |

(A part that does nothing special in its phase runs it as full attention: lazy_eviction prefills densely,
flexprefill decodes densely.)

What the pair reports and needs:
- name: `<prefill policy>+<decode policy>` (the metrics' policy label), the preset's name
  `<prefill preset>+<decode preset>` unless a preset file names it;
- parameters: `{"prefill": {...}, "decode": {...}}`, each part's own (schema: both parts' schemas);
- batched decode when the decode policy allows it; the context limit is the stricter of the parts';
- KV bound: the larger part's when the decode part adopts the prefill part's cache, both parts' otherwise
  (the two caches coexist during the hand-over); step bound: the larger part's, or their sum when the
  decode part observes the prompt inside the prefill's forwards (LazyEviction's `window: auto`,
  `calibration.py`);
- prefix cache: nothing shared (the default), since the parts' states are not one policy's;
- a model with sliding-window layers refuses a plain prefill part before a streaming_llm decode part
  (`handover.model_problem`), with the prompt's other checks (a 400 before the request is queued).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import Field, create_model

from kvmux.policies.base import Policy, PolicyInputError, PolicyParams
from kvmux.policies.composed.calibration import observes_prompt
from kvmux.policies.composed.handover import adopts_cache, model_problem, pair_problem
from kvmux.policies.composed.session import ComposedSession
from kvmux.policies.preset_single import PART_KEYS, Preset, PresetError


@functools.cache
def composed_params_class(prefill: type[PolicyParams], decode: type[PolicyParams]) -> type[PolicyParams]:
    """The parameters of a pair: the prefill part's and the decode part's, as two fields."""
    return create_model(
        f"{prefill.__name__.removesuffix('Params')}Then{decode.__name__}",
        __base__=PolicyParams,
        __doc__="A composed preset's parameters: each part's own.",
        prefill=(prefill, Field(description="parameters of the prefill part's policy")),
        decode=(decode, Field(description="parameters of the decode part's policy")),
    )


class ComposedPolicy(Policy):
    """One preset's policy for the prefill, another's for the decode (built per pair, never registered)."""

    session_class = ComposedSession

    def __init__(self, prefill_preset: str, prefill_policy: Policy, decode_preset: str, decode_policy: Policy):
        self.part_presets = {"prefill": prefill_preset, "decode": decode_preset}
        self.prefill_policy, self.decode_policy = prefill_policy, decode_policy
        self.name = f"{prefill_policy.name}+{decode_policy.name}"
        self.paper = "+".join(dict.fromkeys(p for p in (prefill_policy.paper, decode_policy.paper) if p))
        self.Params = composed_params_class(prefill_policy.Params, decode_policy.Params)
        self.batched_decode = decode_policy.batched_decode
        self.extends_context = prefill_policy.extends_context and decode_policy.extends_context
        self.summary = f"{prefill_policy.name}'s prefill, then {decode_policy.name}'s decode from its cache"

    def part(self, part: str, params: Any) -> Preset:
        """One part as a single-policy preset (its name, policy and the pair's parameters for it)."""
        policy = self.prefill_policy if part == "prefill" else self.decode_policy
        return Preset(self.part_presets[part], policy, getattr(params, part))

    def check_prompt(self, params, info, request, prompt_ids: list[int]) -> None:
        problem = model_problem(self.prefill_policy.name, self.decode_policy.name, info)
        if problem is not None:
            names = self.part_presets
            raise PolicyInputError(
                f"Cannot compose prefill preset '{names['prefill']}' ({self.prefill_policy.name}) with decode preset "
                f"'{names['decode']}' ({self.decode_policy.name}) on this model: {problem}."
            )
        self.prefill_policy.check_prompt(params.prefill, info, request, prompt_ids)
        self.decode_policy.check_prompt(params.decode, info, request, prompt_ids)

    def context_limit(self, params, info) -> int | None:
        limits = (
            self.prefill_policy.context_limit(params.prefill, info),
            self.decode_policy.context_limit(params.decode, info),
        )
        return min((limit for limit in limits if limit is not None), default=None)

    def kv_bytes_needed(self, params, info, num_tokens: int) -> int:
        prefill = self.prefill_policy.kv_bytes_needed(params.prefill, info, num_tokens)
        decode = self.decode_policy.kv_bytes_needed(params.decode, info, num_tokens)
        if adopts_cache(self.prefill_policy.name, self.decode_policy.name):
            return max(prefill, decode)
        return prefill + decode  # both caches exist while the kept K/V are copied

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        prefill = self.prefill_policy.step_bytes_needed(params.prefill, info, num_tokens, chunk, query_tokens)
        decode = self.decode_policy.step_bytes_needed(params.decode, info, num_tokens, chunk, query_tokens)
        if observes_prompt(self.prefill_policy.name, self.decode_policy.name, params.decode):
            return prefill + decode
        return max(prefill, decode)


def compose(name: str, prefill: Preset, decode: Preset, description: str = "", source: str = "") -> Preset:
    """The composed preset of two single-policy presets; PresetError naming the pair when it is not valid."""
    for part, preset in zip(PART_KEYS, (prefill, decode), strict=True):
        if preset.parts is not None:
            raise PresetError(
                f"'{preset.name}' is a composed preset; each part of a composed preset is a single-policy preset",
                f"kv_policy.{part}",
            )
    problem = pair_problem(prefill.policy.name, decode.policy.name)
    if problem is not None:
        raise PresetError(
            f"Cannot compose prefill preset '{prefill.name}' ({prefill.policy.name}) with decode preset "
            f"'{decode.name}' ({decode.policy.name}): {problem}.",
            "kv_policy",
        )
    policy = ComposedPolicy(prefill.name, prefill.policy, decode.name, decode.policy)
    params = policy.Params(prefill=prefill.params, decode=decode.params)
    description = description or f"{prefill.name}'s prefill, then {decode.name}'s decode"
    return Preset(name, policy, params, description, source)
