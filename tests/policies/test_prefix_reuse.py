"""Each policy's prefix-reuse declaration, tested: a session started from a cached prefix computes what a
fresh session computes (exact policies: logits within float tolerance, greedy tokens equal), it
prefills only the rest, and policies that share nothing are never served from the cache."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.base import SessionRequest, drive_to_end, run_prefill
from kvmux.policies.presets import Preset
from kvmux.policies.registry import get_policy
from kvmux.server.prefix_cache import PrefixCache
from kvmux.server.prefix_prefill import plan_prefix, prefill_with_prefix

# tiny-model parameters: windows, blocks and budgets far below the prompts' 300 tokens
EXACT = {
    "full": {},
    "hip": {"mask_k": 32, "block_size_q": 16, "block_stride_q": 4, "sink_tokens": 4, "window": 16, "dense_layers": 0},
    "lazy_eviction": {"budget": 64, "window": 8},
    "lazy_eviction_auto": {"budget": 64, "window": "auto", "calibration_rows": 24},
    "streaming_llm": {"sink_tokens": 4, "window": 48},
}
NO_REUSE = ["actqkv", "infiniretri"]


def make_preset(name: str, params: dict) -> Preset:
    policy = get_policy("lazy_eviction" if name == "lazy_eviction_auto" else name)
    return Preset(name, policy, policy.Params(**params))


def run(preset: Preset, info, runner, cache: PrefixCache | None, ids: list[int], new_tokens: int = 6):
    """Prefill (through the cache when given) then greedy-decode; (tokens restored, logits of every step, tokens)."""
    session = preset.policy.new_session(preset.params, info, SessionRequest())
    plan = plan_prefix(cache, session, preset, runner, ids)
    logits = drive_to_end(prefill_with_prefix(session, runner, ids, plan, cache))
    all_logits, tokens = [logits], []
    for _ in range(new_tokens):
        tokens.append(int(all_logits[-1].argmax()))
        all_logits.append(session.decode(runner, tokens[-1]))
    assert session.tokens_seen == len(ids) + new_tokens
    return (plan.start if plan else 0), all_logits, tokens


@pytest.mark.parametrize("name", list(EXACT))
def test_reused_prefix_gives_the_fresh_result(tiny_llama, name):
    model, info, runner = tiny_llama
    preset = make_preset(name, EXACT[name])
    gen = torch.Generator().manual_seed(1)
    document = torch.randint(0, 256, (230,), generator=gen).tolist()
    first = document + [1] + torch.randint(0, 256, (9,), generator=gen).tolist()
    second = document + [2] + torch.randint(0, 256, (69,), generator=gen).tolist()
    cache = PrefixCache(1 << 30, block_tokens=16)
    start, _, _ = run(preset, info, runner, cache, first)
    assert start == 0 and len(cache) == 1
    start, reused, tokens = run(preset, info, runner, cache, second)
    reuse = preset.policy.prefix_reuse(preset.params, info, runner.prefill_chunk_tokens)
    assert reuse.exact
    # the longest multiple of the granularity both prompts share (and, for a state that cannot be cut,
    # the chunk boundary the first request stored)
    stored = reuse.snapshot_length(len(first))
    expected = stored if not reuse.truncatable else min(len(document), stored) // reuse.granularity * reuse.granularity
    assert start == expected > 0
    _, fresh, fresh_tokens = run(preset, info, runner, None, second)
    assert tokens == fresh_tokens
    for a, b in zip(reused, fresh, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_identical_prompt_prefills_only_its_tail(tiny_llama):
    model, info, runner = tiny_llama
    preset = make_preset("full", {})
    ids = list(range(200))
    cache = PrefixCache(1 << 30, block_tokens=16)
    run(preset, info, runner, cache, ids)
    start, _, _ = run(preset, info, runner, cache, ids)
    assert start == len(ids) - 1  # the last token is always prefilled, for its logits
    auto = make_preset("lazy_eviction_auto", EXACT["lazy_eviction_auto"])
    run(auto, info, runner, cache, ids)
    start, _, _ = run(auto, info, runner, cache, ids)
    assert start == len(ids) - 24  # the calibration rows are read by the request itself


def test_inexact_policy_declares_it(tiny_llama):
    model, info, runner = tiny_llama
    policy = get_policy("flexprefill")
    preset = Preset("flexprefill", policy, policy.Params(block_size=16, min_budget=32))
    reuse = policy.prefix_reuse(preset.params, info, runner.prefill_chunk_tokens)
    assert reuse is not None and not reuse.exact and reuse.truncatable
    cache = PrefixCache(1 << 30, block_tokens=16)
    ids = list(range(256)) * 2
    run(preset, info, runner, cache, ids[:300])
    start, logits, _ = run(preset, info, runner, cache, ids[:320])
    assert start == 288 and torch.isfinite(logits[-1]).all()


@pytest.mark.parametrize("name", NO_REUSE)
def test_question_dependent_policies_share_nothing(tiny_llama, name):
    model, info, runner = tiny_llama
    policy = get_policy(name)
    assert policy.prefix_reuse(policy.Params(), info, runner.prefill_chunk_tokens) is None


def test_no_cache_leaves_the_prefill_unchanged(tiny_llama):
    model, info, runner = tiny_llama
    preset = make_preset("full", {})
    ids = list(range(150))
    session = preset.policy.new_session(preset.params, info, SessionRequest())
    expected = run_prefill(session, runner, torch.tensor([ids]))
    _, logits, _ = run(preset, info, runner, PrefixCache(0), ids, new_tokens=0)
    torch.testing.assert_close(logits[0], expected)


def test_entries_are_keyed_by_policy_parameters_and_model(tiny_llama):
    from dataclasses import replace

    from kvmux.server.prefix_prefill import config_key

    model, info, runner = tiny_llama
    a = make_preset("streaming_llm", {"sink_tokens": 4, "window": 48})
    b = make_preset("streaming_llm", {"sink_tokens": 4, "window": 64})
    same_params = Preset("another_name", a.policy, a.params)
    assert config_key(info, a, 64) != config_key(info, b, 64)
    assert config_key(info, a, 64) == config_key(info, same_params, 64)  # identical states: shared
    assert config_key(info, a, 64) != config_key(info, a, 128)  # the prefill chunk shapes the state
    assert config_key(info, a, 64) != config_key(replace(info, root="another-model"), a, 64)
    cache = PrefixCache(1 << 30, block_tokens=16)
    ids = list(range(200))
    run(a, info, runner, cache, ids)
    start, _, _ = run(b, info, runner, cache, ids)
    assert start == 0  # another window never reads the first one's state
    start, _, _ = run(make_preset("full", {}), info, runner, cache, ids)
    assert start == 0
