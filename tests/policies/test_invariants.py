"""Invariants every registered policy must keep, checked from one table.

1. With a budget that covers the whole sequence, a policy is full attention: its prefill logits
   and every decode step's logits equal a dense forward's (within float rounding).
2. Sessions are independent: two sessions run interleaved (prefill chunks and decode steps
   alternating) produce exactly what each produces alone.

A new policy needs one row in CASES (its covering parameters); the first test fails until it has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from kvmux.policies.base import SessionRequest, run_prefill
from kvmux.policies.registry import policy_names
from tests.policies.helpers import ByteTokenizer, full_logits, new_session

DECODE_STEPS = 12


@dataclass(frozen=True)
class Case:
    policy: str
    covering: dict = field(default_factory=dict)  # keeps and attends everything in an 80-token sequence
    # two different, sparse settings for the independence test (they must give different answers)
    sparse: tuple[dict, dict] = ({}, {})
    reads_text: bool = False  # needs the prompt as text with sentences (InfiniRetri)


ACTQKV_SMALL = {"n_init": 8, "n_local": 32, "block_size": 8, "window": 16}
HIP_SMALL = {"mask_k": 32, "sink_tokens": 4, "window": 16, "block_size_q": 16, "dense_layers": 0}
CASES = {
    "full": Case("full"),
    "streaming_llm": Case(
        "streaming_llm", {"sink_tokens": 4, "window": 200}, ({"sink_tokens": 4, "window": 16}, {"window": 24})
    ),
    "streaming_llm-original": Case(
        "streaming_llm",
        {"sink_tokens": 4, "window": 200, "positions": "original"},
        ({"window": 16, "positions": "original"}, {"sink_tokens": 2, "window": 20, "positions": "original"}),
    ),
    "lazy_eviction": Case(
        "lazy_eviction", {"budget": 200, "window": 8}, ({"budget": 40, "window": 8}, {"budget": 24, "window": 4})
    ),
    "hip": Case(
        "hip",
        {"mask_k": 64, "sink_tokens": 4, "window": 16, "dense_layers": 0},
        (HIP_SMALL, {**HIP_SMALL, "mask_k": 16, "refresh_interval": 3}),
    ),
    # `ordered` slots are the absolute positions once every block is retrieved (InfLLM positions are not)
    "actqkv": Case(
        "actqkv",
        {**ACTQKV_SMALL, "topk": 100, "min_blocks": 0, "positions": "ordered"},
        (
            {**ACTQKV_SMALL, "topk": 1, "min_blocks": 1},
            {"n_init": 4, "n_local": 48, "block_size": 4, "window": 8, "topk": 3},
        ),
    ),
    "actqkv-absolute": Case("actqkv", {**ACTQKV_SMALL, "topk": 100, "min_blocks": 0, "positions": "absolute"}),
    "flexprefill": Case(
        "flexprefill",
        {"block_size": 16, "gamma": 1.0, "tau": 0.0, "min_budget": 0, "backend": "eager"},
        (
            {"block_size": 16, "gamma": 0.7, "min_budget": 16, "prefill_chunk": 48, "backend": "eager"},
            {"block_size": 32, "gamma": 0.95, "tau": 0.5, "min_budget": 32, "prefill_chunk": 40, "backend": "eager"},
        ),
    ),
    "infiniretri": Case(
        "infiniretri",
        {"chunk_tokens": 64, "top_k": 4096},
        ({"chunk_tokens": 128, "top_k": 4, "layer": 0}, {"chunk_tokens": 96, "top_k": 12, "layer": -1, "window": 2}),
        reads_text=True,
    ),
}


def inputs(case: Case, info, seed: int) -> tuple[object, torch.Tensor, int, SessionRequest]:
    """(info, ids [1, T], prompt length, request) for one run."""
    generator = torch.Generator().manual_seed(seed)
    if not case.reads_text:
        return info, torch.randint(0, 256, (1, 80), generator=generator), 80 - DECODE_STEPS, SessionRequest()
    weights = torch.randint(10, 99, (25,), generator=generator).tolist()
    prompt = "Read this.\n" + " ".join(f"Item {i} weighs {w} grams." for i, w in enumerate(weights))
    prompt += "\nWhich item weighs most?\n"
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(prompt + "Item 7 weighs the most.")
    info = dataclasses.replace(info, tokenizer=tokenizer)
    return info, torch.tensor([ids]), len(tokenizer.encode(prompt)), SessionRequest(prompt_text=prompt)


def steps(session, runner, ids: torch.Tensor, prompt_len: int):
    """Prefill, then feed the rest token by token: yields after every chunk and step; returns logits."""
    logits = [(yield from session.prefill(runner, ids[:, :prompt_len]))]
    for token in ids[0, prompt_len:].tolist():
        yield
        logits.append(session.decode(runner, token))
    return torch.stack(logits)


def run_alone(session, runner, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    out = [run_prefill(session, runner, ids[:, :prompt_len])]
    out += [session.decode(runner, token) for token in ids[0, prompt_len:].tolist()]
    return torch.stack(out)


def test_every_registered_policy_has_a_case():
    assert set(policy_names()) <= {case.policy for case in CASES.values()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_covering_budget_reproduces_full(tiny, name):
    model, info, runner = tiny
    case = CASES[name]
    info, ids, prompt_len, request = inputs(case, info, seed=0)
    session = new_session(case.policy, info, request, **case.covering)
    got = run_alone(session, runner, ids, prompt_len)
    torch.testing.assert_close(got, full_logits(model, ids)[prompt_len - 1 :], atol=2e-5, rtol=1e-4)
    assert session.stats().tokens_seen == ids.shape[1]  # every prompt and fed token, counted once


@pytest.mark.parametrize("name", sorted(CASES))
def test_interleaved_sessions_equal_sessions_alone(tiny_llama, name):
    """Two sessions with different settings and prompts, run one unit of work at a time each, give
    exactly the logits and stats each gives alone."""
    model, info, runner = tiny_llama
    case = CASES[name]
    runs = [(*inputs(case, info, seed), params) for seed, params in zip((1, 2), case.sparse, strict=True)]
    alone, stats = [], []
    for run_info, ids, prompt_len, request, params in runs:
        session = new_session(case.policy, run_info, request, **params)
        alone.append(run_alone(session, runner, ids, prompt_len))
        stats.append(session.stats().as_dict())
    sessions = [new_session(case.policy, i, r, **params) for i, _, _, r, params in runs]
    generators = [steps(s, runner, ids, n) for s, (_, ids, n, _, _) in zip(sessions, runs, strict=True)]
    results: list[torch.Tensor | None] = [None, None]
    while any(r is None for r in results):
        for k, gen in enumerate(generators):
            if results[k] is None:
                try:
                    next(gen)
                except StopIteration as stop:
                    results[k] = stop.value
    for want, got, want_stats, session in zip(alone, results, stats, sessions, strict=True):
        assert torch.equal(want, got) and session.stats().as_dict() == want_stats
    assert not torch.equal(alone[0], alone[1])
