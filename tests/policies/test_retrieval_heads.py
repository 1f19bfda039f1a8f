"""Retrieval heads in the sparse policies: the profile's best heads run dense in HiP and FlexPrefill,
InfiniRetri's `layer: calibrated`, and the clear error when the model has no profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmux.models.retrieval_profile import RetrievalProfile
from kvmux.policies.base import AttentionCall, PolicyInputError, SessionRequest
from kvmux.policies.dense import sdpa
from kvmux.policies.registry import get_policy
from tests.policies.helpers import new_session

HIP = dict(mask_k=16, block_size_q=16, sink_tokens=2, window=8, dense_layers=0)  # budget 26 of 200 keys
FLEX = dict(block_size=16, min_budget=16, gamma=0.5)


def with_profile(info, best: list[tuple[int, int]]) -> object:
    """`info` with a synthetic profile whose best heads are `best`, in that order."""
    scores = [[0.0] * info.num_heads for _ in range(info.num_layers)]
    for rank, (layer, head) in enumerate(best):
        scores[layer][head] = 1.0 - 0.1 * rank
    profile = RetrievalProfile("tiny", "0" * 64, tuple(tuple(row) for row in scores))
    return dataclasses.replace(info, retrieval_heads=profile)


def prefill_call(info, layer: int = 1, tq: int = 200) -> AttentionCall:
    torch.manual_seed(layer)
    hq, hkv, d = info.num_heads, info.num_kv_heads, info.head_dim
    q, k, v = torch.randn(1, hq, tq, d) * 3, torch.randn(1, hkv, tq, d) * 3, torch.randn(1, hkv, tq, d)
    return AttentionCall(layer, q, k, v, None, d**-0.5)


def dense_heads(session, call: AttentionCall) -> set[int]:
    """Query heads whose output equals dense causal attention."""
    with torch.inference_mode():
        out = session.attention(call)
    dense = sdpa(call.query, call.key, call.value, None, call.scaling)
    return {h for h in range(out.shape[2]) if torch.allclose(out[:, :, h], dense[:, :, h], atol=1e-5, rtol=1e-4)}


@pytest.mark.parametrize(("policy", "params"), [("hip", HIP), ("flexprefill", FLEX)])
def test_the_profile_decides_which_heads_run_dense(tiny_llama, policy, params):
    _, info, _ = tiny_llama
    call = prefill_call(info)
    assert dense_heads(new_session(policy, info, **params), call) == set()  # every head sparse
    best = [(1, 2), (0, 1), (1, 0)]  # two heads in layer 1 (the call's), one in layer 0
    info_rh = with_profile(info, best)
    assert dense_heads(new_session(policy, info_rh, retrieval_heads=3, **params), call) == {2, 0}
    assert dense_heads(new_session(policy, info_rh, retrieval_heads=1, **params), call) == {2}
    other = with_profile(info, [(1, 3), (1, 1)])
    assert dense_heads(new_session(policy, other, retrieval_heads=2, **params), call) == {3, 1}
    assert dense_heads(new_session(policy, info_rh, retrieval_heads=0, **params), call) == set()


def test_dense_retrieval_heads_raise_hips_density_but_not_its_sparse_bound(tiny_llama):
    _, info, _ = tiny_llama
    call = prefill_call(info)
    plain, rh = (
        new_session("hip", info, **HIP),
        new_session("hip", with_profile(info, [(1, 2)]), retrieval_heads=1, **HIP),
    )
    with torch.inference_mode():
        plain.attention(call)
        rh.attention(call)
    plain_stats, rh_stats = plain.stats(), rh.stats()
    assert rh_stats.attention_density > plain_stats.attention_density
    assert rh_stats.extra["hip_max_keys_per_query"] == plain_stats.extra["hip_max_keys_per_query"] == 26


@pytest.mark.parametrize(("policy", "params"), [("hip", HIP), ("flexprefill", FLEX)])
def test_gate_heads_add_the_best_gate_gains_besides_the_retrieval_heads(tiny_llama, policy, params):
    _, info, _ = tiny_llama
    call = prefill_call(info)  # layer 1
    profiled = with_profile(info, [(1, 2), (0, 1)])
    gains = [[0.0] * info.num_heads for _ in range(info.num_layers)]
    gains[1] = [0.1, 0.0, 0.9, 0.5]  # head 2, the best gain, is already a retrieval head
    gains[0][3] = 0.3
    other = "flexprefill" if policy == "hip" else "hip"
    profile = dataclasses.replace(profiled.retrieval_heads, gates={policy: tuple(map(tuple, gains)), other: ()})
    gated = dataclasses.replace(info, retrieval_heads=profile)
    assert dense_heads(new_session(policy, gated, retrieval_heads=1, gate_heads=1, **params), call) == {2, 3}
    assert dense_heads(new_session(policy, gated, retrieval_heads=1, gate_heads=3, **params), call) == {2, 3, 0}
    assert dense_heads(new_session(policy, gated, gate_heads=1, **params), call) == {2}  # no retrieval heads
    with pytest.raises(PolicyInputError, match="calibrate --gates") as error:
        new_session(policy, profiled, retrieval_heads=1, gate_heads=1, **params)  # a profile without its gains
    assert error.value.param == "kv_policy.gate_heads"
    only_other = dataclasses.replace(
        info, retrieval_heads=dataclasses.replace(profile, gates={other: profile.gates[policy]})
    )
    with pytest.raises(PolicyInputError, match=f"{policy} gate gains"):
        new_session(policy, only_other, retrieval_heads=1, gate_heads=1, **params)  # another policy's gains
    with pytest.raises(PolicyInputError, match="exceed"):
        new_session(policy, gated, retrieval_heads=2, gate_heads=7, **params)
    sparse = get_policy(policy)
    with pytest.raises(PolicyInputError, match="gate_heads"):
        sparse.check_prompt(sparse.Params(gate_heads=2), info, SessionRequest(), [1, 2, 3])


@pytest.mark.parametrize(
    ("policy", "params"), [("hip", {"retrieval_heads": 4}), ("flexprefill", {"retrieval_heads": 4})]
)
def test_asking_for_retrieval_heads_without_a_profile_is_a_clear_input_error(tiny_llama, policy, params):
    _, info, _ = tiny_llama
    with pytest.raises(PolicyInputError, match="kvmux calibrate") as error:
        new_session(policy, info, **params)
    assert error.value.param == "kv_policy.retrieval_heads" and error.value.status == 400
    pol = get_policy(policy)
    with pytest.raises(PolicyInputError):
        pol.check_prompt(pol.Params(**params), info, SessionRequest(), [1, 2, 3])
    too_many = with_profile(info, [(0, 0)])
    with pytest.raises(PolicyInputError, match="exceeds the model's 8 heads"):
        new_session(policy, too_many, retrieval_heads=9)


def test_infiniretri_calibrated_scores_in_the_profile_best_layer(tiny_llama):
    _, info, _ = tiny_llama
    deep = dataclasses.replace(info, num_layers=6)
    scores = [[0.0] * info.num_heads for _ in range(6)]
    scores[4] = [0.5] * info.num_heads  # best mean, though layer 2 holds the single best head
    scores[2][0] = 0.9
    profiled = dataclasses.replace(deep, retrieval_heads=RetrievalProfile("t", "0" * 64, tuple(map(tuple, scores))))
    assert new_session("infiniretri", profiled, layer="calibrated").scoring_layer == 4
    with pytest.raises(PolicyInputError, match="retrieval-head profile") as error:
        new_session("infiniretri", deep, layer="calibrated")
    assert error.value.param == "kv_policy.layer"
    pol = get_policy("infiniretri")
    with pytest.raises(PolicyInputError):
        pol.check_prompt(pol.Params(layer="calibrated"), deep, SessionRequest(prompt_text="a\n\nb?"), [1, 2])
