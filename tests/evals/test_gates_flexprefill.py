"""FlexPrefill gate gains: the replayed one-pass cells, dense at g = 1, the gradient against a finite
difference, the retrieval heads that cannot gain, and the prompts it refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmux.evals.calibrate.gates import gate_gains, top_gains
from kvmux.evals.calibrate.gates_flexprefill import flexprefill_answer_nll
from kvmux.models.retrieval_profile import RetrievalProfile
from kvmux.policies.base import SessionRequest, run_prefill
from kvmux.policies.preset_single import Preset
from kvmux.policies.registry import get_policy

FLEX = dict(block_size=16, min_budget=16, gamma=0.5)
ANSWER = [7, 11, 3]


def flex_preset(**params) -> Preset:
    policy = get_policy("flexprefill")
    return Preset("fp_test", policy, policy.Params(**{**FLEX, **params}))


def prompt_ids(length: int = 300) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(5)).tolist()


def served_nll(runner, info, preset: Preset, ids: list[int], answer: list[int]) -> tuple[float, torch.Tensor]:
    """The answer's NLL as the policy serves it: one prefill, then one decode step per answer token."""
    session = preset.policy.new_session(preset.params, info, SessionRequest())
    with torch.inference_mode():
        logits = run_prefill(session, runner, torch.tensor([ids])).float()
        first = logits.log_softmax(-1).flatten()
        nll = -float(first[answer[0]])
        for token, following in zip(answer, answer[1:], strict=False):
            nll -= float(session.decode(runner, token).float().log_softmax(-1)[following])
    session.close()
    return nll, first


def zeros(info) -> torch.Tensor:
    return torch.zeros(info.num_layers, info.num_heads)


def test_at_zero_the_gated_forward_is_the_served_one_pass_and_at_one_it_moves(tiny_llama):
    _, info, runner = tiny_llama
    ids, preset, full = prompt_ids(), flex_preset(), Preset("full", get_policy("full"), get_policy("full").Params())
    sparse_nll, sparse_first = served_nll(runner, info, preset, ids, ANSWER)
    dense_nll, dense_first = served_nll(runner, info, full, ids, ANSWER)
    assert abs(sparse_nll - dense_nll) > 1e-3  # the prompt is long enough to be sparse
    nll, first = flexprefill_answer_nll(runner, info, preset, ids, ANSWER, zeros(info))
    assert float(nll.detach()) == pytest.approx(sparse_nll, abs=1e-3)
    assert torch.allclose(first.detach(), sparse_first, atol=1e-4)
    # dense at the gated rows only: the prefix keeps its sparse attention, so compare with a prefix-sparse run
    ones = torch.ones(info.num_layers, info.num_heads)
    gated, _ = flexprefill_answer_nll(runner, info, preset, ids, ANSWER, ones)
    assert abs(float(gated.detach()) - sparse_nll) > 1e-4


def test_with_every_head_gated_a_short_tail_prompt_is_dense(tiny_llama):
    _, info, runner = tiny_llama
    ids = prompt_ids(40)  # three blocks of 16: the whole prompt is the gated rows (and sparse at g = 0)
    preset = flex_preset(min_budget=0)
    full = Preset("full", get_policy("full"), get_policy("full").Params())
    dense_nll, _ = served_nll(runner, info, full, ids, ANSWER)
    sparse_nll, _ = served_nll(runner, info, preset, ids, ANSWER)
    ones = torch.ones(info.num_layers, info.num_heads)
    assert float(flexprefill_answer_nll(runner, info, preset, ids, ANSWER, ones)[0].detach()) == pytest.approx(
        dense_nll, abs=1e-4
    )
    assert float(flexprefill_answer_nll(runner, info, preset, ids, ANSWER, zeros(info))[0].detach()) == pytest.approx(
        sparse_nll, abs=1e-4
    )


def test_the_gain_is_the_first_order_drop_of_every_answer_tokens_loss(tiny_llama):
    model, info, runner = tiny_llama
    preset, ids = flex_preset(), prompt_ids()
    found = gate_gains(runner, info, preset, ids, ANSWER)
    assert all(p.grad is None for p in model.parameters())
    assert found.gains.abs().sum() > 0
    layer, head, _ = top_gains(found.gains.abs(), 1)[0]
    eps, moved = 1e-2, []
    for sign in (1, -1):
        gates = zeros(info)
        gates[layer, head] = sign * eps
        moved.append(float(flexprefill_answer_nll(runner, info, preset, ids, ANSWER, gates)[0].detach()))
    slope = (moved[0] - moved[1]) / (2 * eps)  # central difference
    assert slope == pytest.approx(-float(found.gains[layer, head]), rel=0.02, abs=1e-4)


def test_retrieval_heads_gain_nothing(tiny_llama):
    _, info, runner = tiny_llama
    scores = [[0.0] * info.num_heads for _ in range(info.num_layers)]
    scores[1][2] = 1.0
    profile = RetrievalProfile("tiny", "0" * 64, tuple(map(tuple, scores)))
    info_rh = dataclasses.replace(info, retrieval_heads=profile)
    gains = gate_gains(runner, info_rh, flex_preset(retrieval_heads=1), prompt_ids(), ANSWER).gains
    assert abs(float(gains[1, 2])) < 1e-6 < float(gains[1].abs().sum())  # dense already: rounding only


@pytest.mark.parametrize(("params", "length"), [({"prefill_chunk": 128}, 300), ({"max_single_pass_tokens": 256}, 300)])
def test_prompts_not_prefilled_in_one_forward_are_refused(tiny_llama, params, length):
    _, info, runner = tiny_llama
    with pytest.raises(ValueError, match="one-pass prefill"):
        flexprefill_answer_nll(runner, info, flex_preset(**params), prompt_ids(length), ANSWER, zeros(info))
