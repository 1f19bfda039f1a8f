"""Composed presets on tiny random models: a part runs exactly as it does alone, and the hand-over leaves
the decode part the cache its rules say (every valid pair, the refused ones, the counters, the stats)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmux.policies.base import PolicyInputError, PolicySession, SessionRequest, StepInterrupted, run_prefill
from kvmux.policies.composed import CACHE_KIND, ComposedSession, compose, pair_problem
from kvmux.policies.kv_buffer import GrowableCache
from kvmux.policies.presets import Preset, PresetError, load_presets, resolve_request_policy
from kvmux.policies.registry import get_policy, policy_names
from kvmux.policies.rope import rotate
from tests.tiny_models import make_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "policies"
PROMPT, STEPS = 18, 10
# decode parts whose prefill is dense alone (prompt within their budgets) while their decode is not
DECODERS = {
    "lazy_eviction": dict(budget=20, window=4),
    "lazy_eviction_auto": dict(budget=20, window="auto", calibration_rows=8),
    "hip": dict(mask_k=8, block_size_q=8, block_size_k=2, sink_tokens=2, window=8, dense_layers=0),
    "streaming_cache": dict(sink_tokens=2, window=16),
    "streaming_original": dict(sink_tokens=2, window=16, positions="original"),
    "flexprefill": dict(block_size=16, min_budget=16),
}
# prefill parts that are sparse on a 96-token prompt
SPARSE_PREFILLS = {
    "flexprefill": dict(block_size=16, min_budget=16, gamma=0.5, tau=0.0),
    "hip": dict(mask_k=8, block_size_q=8, block_size_k=2, sink_tokens=2, window=8, dense_layers=0),
}


# preset names of the tests -> their policy (other names are the policy's)
POLICY_OF = {
    "lazy_eviction_auto": "lazy_eviction",
    "streaming_cache": "streaming_llm",
    "streaming_original": "streaming_llm",
}


def preset(key: str, **params) -> Preset:
    policy = get_policy(POLICY_OF.get(key, key))
    return Preset(key, policy, policy.Params(**params))


def pair(prefill: Preset, decode: Preset) -> Preset:
    return compose(f"{prefill.name}+{decode.name}", prefill, decode)


def start(spec: Preset, info) -> PolicySession:
    return spec.policy.new_session(spec.params, info, SessionRequest())


def teacher_forced(session: PolicySession, runner, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits [1 + len(tokens), V]: after the prompt, then after each fed token."""
    out = [run_prefill(session, runner, ids)]
    out += [session.decode(runner, token) for token in tokens]
    return torch.stack(out)


def prompt(length: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 256, (1, length), generator=generator)
    return ids, torch.randint(0, 256, (STEPS,), generator=generator).tolist()


def dense_adopter(source: PolicySession, info, seen: int) -> PolicySession:
    """A full session that continues from `source`'s cache with `seen` tokens counted (the reference)."""
    full = start(preset("full"), info)
    full.cache, full.tokens_seen = source.cache, seen
    return full


@pytest.mark.parametrize("key", list(DECODERS))
def test_dense_prefill_then_x_decodes_as_x_alone(tiny_llama, key):
    _, info, runner = tiny_llama
    ids, tokens = prompt(PROMPT)
    alone = start(preset(key, **DECODERS[key]), info)
    expected = teacher_forced(alone, runner, ids, tokens)
    composed = start(pair(preset("full"), preset(key, **DECODERS[key])), info)
    got = teacher_forced(composed, runner, ids, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    dense = teacher_forced(start(preset("full"), info), runner, ids, tokens)
    if key != "flexprefill":  # every other decode part drops or skips keys within these steps
        assert (got[1:] - dense[1:]).abs().max() > 1e-3
    if key.startswith("lazy"):
        decode = composed.decode_part
        assert decode.evictions > 0 and (decode.window, decode.window_source) == (alone.window, alone.window_source)
    assert composed.stats().tokens_kept == alone.stats().tokens_kept


@pytest.mark.parametrize("key", list(SPARSE_PREFILLS))
def test_x_prefill_then_full_decodes_densely_from_x_cache(tiny_llama, key):
    _, info, runner = tiny_llama
    ids, tokens = prompt(96)
    alone = start(preset(key, **SPARSE_PREFILLS[key]), info)
    first = run_prefill(alone, runner, ids)
    reference = dense_adopter(alone, info, ids.shape[1])
    expected = torch.stack([first] + [reference.decode(runner, t) for t in tokens])
    composed = start(pair(preset(key, **SPARSE_PREFILLS[key]), preset("full")), info)
    got = teacher_forced(composed, runner, ids, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    kv = composed.stats().as_dict()
    assert kv["prefill"]["attention_density"] < 1 and kv["attention_density"] == kv["prefill"]["attention_density"]
    assert kv["tokens_seen"] == kv["tokens_kept"] == 96 + STEPS and kv["handover_tokens"] == 96


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_ring_prefill_then_full_decodes_over_what_the_ring_kept(tiny_llama, positions):
    _, info, runner = tiny_llama
    ids, tokens = prompt(40)
    ring = dict(sink_tokens=2, window=12, positions=positions)
    alone = start(preset(f"streaming_{positions}", **ring), info)
    first = run_prefill(alone, runner, ids)
    kept = alone.cache.layers
    reference = start(preset("full"), info)
    for idx, layer in enumerate(kept):
        keys = layer.keys
        if positions == "cache":  # stored un-rotated: placed at consecutive positions
            keys = rotate(keys, torch.arange(keys.shape[-2]), info.inv_freq)
        reference.cache.update(keys, layer.values, idx)
    reference.tokens_seen = 40 if positions == "original" else 14  # decode positions: absolute, or after the ring
    expected = torch.stack([first] + [reference.decode(runner, t) for t in tokens])
    composed = start(pair(preset(f"streaming_{positions}", **ring), preset("full")), info)
    got = teacher_forced(composed, runner, ids, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert composed.decode_part.tokens_seen == 40 + STEPS and composed.stats().tokens_kept == 14 + STEPS
    assert composed.position_shift == (0 if positions == "original" else 40 - 14)


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_dense_prefill_hands_sinks_and_window_to_a_ring(tiny_llama, positions):
    _, info, runner = tiny_llama
    ids, tokens = prompt(30)
    full = start(preset("full"), info)
    first = run_prefill(full, runner, ids)
    ring = preset(f"streaming_{positions}", sink_tokens=2, window=8, positions=positions)
    composed = start(pair(preset("full"), ring), info)
    torch.testing.assert_close(run_prefill(composed, runner, ids), first)
    keep = torch.tensor([0, 1, *range(22, 30)])
    for mine, dense in zip(composed.cache.layers, full.cache.layers, strict=True):
        keys = mine.keys if positions == "original" else rotate(mine.keys, keep, info.inv_freq)
        torch.testing.assert_close(keys, dense.keys[..., keep, :], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, dense.values[..., keep, :])
    assert composed.tokens_seen == 30 and composed.position_shift == 0
    expected_position = 30 if positions == "original" else 10
    assert composed.next_position_ids(1).item() == expected_position
    # the first decode step attends exactly the kept tokens (the reference: a dense cache of those tokens)
    reference = start(preset("full"), info)
    for idx, layer in enumerate(full.cache.layers):
        keys = layer.keys[..., keep, :]
        if positions == "cache":
            keys = rotate(rotate(keys, -keep, info.inv_freq), torch.arange(10), info.inv_freq)
        reference.cache.update(keys, layer.values[..., keep, :], idx)
    reference.tokens_seen = expected_position
    first_step = composed.decode(runner, tokens[0])
    torch.testing.assert_close(first_step, reference.decode(runner, tokens[0]), atol=1e-4, rtol=1e-4)
    assert composed.stats().tokens_kept == 10


def test_lazy_eviction_calibrates_on_another_policy_prefill(tiny_llama):
    _, info, runner = tiny_llama
    ids, _ = prompt(96)
    auto = preset("lazy_eviction_auto", budget=20, window="auto", calibration_rows=32)
    sparse = start(pair(preset("flexprefill", **SPARSE_PREFILLS["flexprefill"]), auto), info)
    run_prefill(sparse, runner, ids)
    assert sparse.decode_part.window is not None and sparse.decode_part.window_source == "prefill"
    ring = start(pair(preset("streaming_cache", sink_tokens=2, window=16), auto), info)
    run_prefill(ring, runner, ids)  # the ring evicts between forwards: W comes from the decode steps
    assert ring.decode_part.window is None and ring.decode_part.window_source == "pending"


def test_every_pair_of_composable_policies_is_valid_and_the_others_are_refused():
    names = policy_names()
    for prefill in names:
        for decode in names:
            problem = pair_problem(prefill, decode)
            assert (problem is None) == (prefill in CACHE_KIND and decode in CACHE_KIND), (prefill, decode)
    for name in ("actqkv", "infiniretri"):
        assert pair_problem(name, "full") and pair_problem("full", name)
    with pytest.raises(PresetError, match=r"prefill preset 'full' \(full\) with decode preset 'actqkv'.*block memory"):
        pair(preset("full"), preset("actqkv"))
    with pytest.raises(PresetError, match="infiniretri.*rebuilt prompt"):
        pair(preset("infiniretri"), preset("full"))


@pytest.mark.parametrize("prefill", sorted(CACHE_KIND))
def test_every_valid_pair_generates_with_consistent_counters(tiny_llama, prefill):
    _, info, runner = tiny_llama
    ids, tokens = prompt(40)
    small = {"streaming_llm": dict(sink_tokens=2, window=12), "lazy_eviction": dict(budget=16, window=4)}
    small |= {"hip": SPARSE_PREFILLS["hip"], "flexprefill": SPARSE_PREFILLS["flexprefill"]}
    for decode in sorted(CACHE_KIND):
        spec = pair(preset(prefill, **small.get(prefill, {})), preset(decode, **small.get(decode, {})))
        session = start(spec, info)
        logits = teacher_forced(session, runner, ids, tokens[:4])
        assert torch.isfinite(logits).all() and isinstance(session, ComposedSession)
        kv = session.stats().as_dict()
        assert kv["tokens_seen"] == session.decode_part.tokens_seen == 44 and kv["decode"]["tokens_seen"] == 44
        assert kv["prefill"]["tokens_seen"] == 40 and spec.policy.name == f"{prefill}+{decode}"
        assert spec.policy.prefix_reuse(spec.params, info, 64) is None  # nothing shared with the prefix cache
        session.close()


def test_batched_decode_of_composed_rows_matches_decoding_alone(tiny_llama):
    _, info, runner = tiny_llama
    ids, tokens = prompt(40)
    specs = [
        pair(preset("flexprefill", **SPARSE_PREFILLS["flexprefill"]), preset("streaming_cache", window=8)),
        pair(preset("streaming_cache", sink_tokens=2, window=12), preset("lazy_eviction", budget=16, window=4)),
    ]
    assert all(spec.policy.batched_decode for spec in specs)
    alone, batched = [start(s, info) for s in specs], [start(s, info) for s in specs]
    for session in alone + batched:
        run_prefill(session, runner, ids)
    for token in tokens[:6]:
        expected = torch.stack([session.decode(runner, token) for session in alone])
        torch.testing.assert_close(runner.decode_batch(batched, [token, token]), expected, rtol=1e-4, atol=1e-4)
    assert [s.stats().tokens_kept for s in batched] == [s.stats().tokens_kept for s in alone]


def test_interrupt_reaches_the_running_part(tiny_llama):
    _, info, runner = tiny_llama
    ids, tokens = prompt(40)
    spec = pair(preset("flexprefill", **SPARSE_PREFILLS["flexprefill"]), preset("lazy_eviction", budget=16))
    stopped = start(spec, info)
    stopped.interrupt = lambda: True
    with pytest.raises(StepInterrupted):
        run_prefill(stopped, runner, ids)
    session, stop = start(spec, info), []
    session.interrupt = lambda: bool(stop)
    run_prefill(session, runner, ids)
    stop.append(True)
    with pytest.raises(StepInterrupted):
        session.decode(runner, tokens[0])
    assert isinstance(session.decode_part.cache, GrowableCache) and session.tokens_seen == 40


def test_request_objects_resolve_to_composed_presets():
    presets = load_presets(CONFIGS)
    spec = {"prefill": "flexprefill", "decode": {"preset": "lazy_eviction", "budget": 512}, "query": "q?"}
    composed, query = resolve_request_policy(spec, presets, "full")
    assert (composed.name, composed.policy.name, query) == ("flexprefill+lazy_eviction",) * 2 + ("q?",)
    assert composed.params.decode.budget == 512 and composed.params.prefill == presets["flexprefill"].params
    named, _ = resolve_request_policy({"preset": "flexprefill+streaming_llm", "decode": {"window": 64}}, presets, "x")
    decode = named.params.decode
    assert named.name == "flexprefill+streaming_llm" and (decode.window, decode.sink_tokens) == (64, 4)
    assert resolve_request_policy("flexprefill+hip", presets, "full")[0] is presets["flexprefill+hip"]
    listing = presets["flexprefill+lazy_eviction"].as_dict()
    assert listing["composed"] == {"prefill": "flexprefill", "decode": "lazy_eviction"}
    assert set(listing["params"]) == set(listing["schema"]["properties"]) == {"prefill", "decode"}


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"prefill": "flexprefill"}, "kv_policy.decode"),
        ({"prefill": "full", "decode": {"preset": "lazy_eviction", "budget": -1}}, "kv_policy.decode.budget"),
        ({"prefill": "full", "decode": {"preset": "lazy_eviction", "nope": 1}}, "kv_policy.decode.nope"),
        ({"prefill": "nope", "decode": "full"}, "kv_policy.prefill.preset"),
        ({"prefill": "flexprefill+hip", "decode": "full"}, "kv_policy.prefill.preset"),
        ({"prefill": 3, "decode": "full"}, "kv_policy.prefill"),
        ({"prefill": {"preset": "full", "query": "q"}, "decode": "full"}, "kv_policy.prefill.query"),
        ({"prefill": "full", "decode": "full", "window": 3}, "kv_policy.window"),
        ({"preset": "streaming_llm", "decode": "full"}, "kv_policy.preset"),
        ({"preset": "flexprefill+hip", "window": 3}, "kv_policy.window"),
        ({"prefill": "actqkv", "decode": "full"}, "kv_policy"),
    ],
)
def test_bad_composed_requests_name_the_field(spec, param):
    with pytest.raises(PresetError) as info:
        resolve_request_policy(spec, load_presets(CONFIGS), "full")
    assert info.value.param == param and info.value.status == 400


def test_composed_preset_files_name_presets_loaded_with_them(tmp_path):
    (tmp_path / "a_mix.yaml").write_text("prefill: z_dense\ndecode: {preset: z_lazy, budget: 64}\n")
    (tmp_path / "z_dense.yaml").write_text("policy: full\n")
    (tmp_path / "z_lazy.yaml").write_text("policy: lazy_eviction\n")
    mix = load_presets(tmp_path)["a_mix"]
    assert mix.policy.name == "full+lazy_eviction" and mix.params.decode.budget == 64
    assert mix.source.endswith("a_mix.yaml") and mix.parts == {"prefill": "z_dense", "decode": "z_lazy"}
    (tmp_path / "bad.yaml").write_text("prefill: nope\ndecode: z_lazy\n")
    with pytest.raises(PresetError, match=r"bad\.yaml: Unknown prefill preset 'nope'"):
        load_presets(tmp_path)
    (tmp_path / "bad.yaml").write_text("policy: full\nprefill: z_dense\ndecode: z_lazy\n")
    with pytest.raises(PresetError, match=r"bad\.yaml: unknown field\(s\) \['policy'\]"):
        load_presets(tmp_path)


def test_sliding_window_layers_refuse_a_cut_to_a_ring_before_the_request_runs():
    sliding = dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    _, info, runner = make_tiny("qwen2", **sliding)
    cut = pair(preset("full"), preset("streaming_cache", sink_tokens=2, window=8))
    with pytest.raises(PolicyInputError, match="'full' .* 'streaming_cache' .* sliding-window layers"):
        cut.policy.check_prompt(cut.params, info, SessionRequest(), list(range(30)))
    ids, tokens = prompt(30)
    kept = pair(preset("streaming_cache", sink_tokens=2, window=8), preset("full"))
    kept.policy.check_prompt(kept.params, info, SessionRequest(), ids[0].tolist())
    assert torch.isfinite(teacher_forced(start(kept, info), runner, ids, tokens[:3])).all()
