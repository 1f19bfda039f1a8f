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
from tests.policies.helpers import full_logits, new_session

DECODE_STEPS = 12


@dataclass(frozen=True)
class Case:
    params: dict = field(default_factory=dict)
    reads_text: bool = False  # needs the prompt as text with sentences (InfiniRetri)


# parameters under which each policy keeps and attends everything in an 80-token sequence
CASES = {
    "full": Case(),
    "streaming_llm": Case({"sink_tokens": 4, "window": 200}),
    "lazy_eviction": Case({"budget": 200, "window": 8}),
    "hip": Case({"mask_k": 64, "sink_tokens": 4, "window": 16, "dense_layers": 0}),
    # `ordered` slots are the absolute positions once every block is retrieved (InfLLM positions are not)
    "actqkv": Case(
        {"n_init": 8, "n_local": 32, "block_size": 8, "window": 16, "topk": 100, "min_blocks": 0}
        | {"positions": "ordered"}
    ),
    "flexprefill": Case({"block_size": 16, "gamma": 1.0, "tau": 0.0, "min_budget": 0, "backend": "eager"}),
    "infiniretri": Case({"chunk_tokens": 64, "top_k": 4096}, reads_text=True),
}


class ByteTokenizer:
    """One token per UTF-8 byte (the tiny models' 256-token vocabulary)."""

    all_special_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, **kwargs) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def inputs(case: Case, info, seed: int) -> tuple[object, torch.Tensor, int, SessionRequest]:
    """(info, ids [1, T], prompt length, request) for one run."""
    generator = torch.Generator().manual_seed(seed)
    if not case.reads_text:
        return info, torch.randint(0, 256, (1, 80), generator=generator), 80 - DECODE_STEPS, SessionRequest()
    weights = torch.randint(10, 99, (12,), generator=generator).tolist()
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
    assert set(policy_names()) <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_covering_budget_reproduces_full(tiny, name):
    model, info, runner = tiny
    case = CASES[name]
    info, ids, prompt_len, request = inputs(case, info, seed=0)
    session = new_session(name, info, request, **case.params)
    got = run_alone(session, runner, ids, prompt_len)
    torch.testing.assert_close(got, full_logits(model, ids)[prompt_len - 1 :], atol=2e-5, rtol=1e-4)
    assert session.stats().tokens_seen >= ids.shape[1] - 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_interleaved_sessions_equal_sessions_alone(tiny_llama, name):
    model, info, runner = tiny_llama
    case = CASES[name]
    runs = [inputs(case, info, seed) for seed in (1, 2)]
    alone = [run_alone(new_session(name, i, r, **case.params), runner, ids, n) for i, ids, n, r in runs]
    generators = [steps(new_session(name, i, r, **case.params), runner, ids, n) for i, ids, n, r in runs]
    results: list[torch.Tensor | None] = [None, None]
    while any(r is None for r in results):  # alternate one unit of work at a time
        for k, gen in enumerate(generators):
            if results[k] is None:
                try:
                    next(gen)
                except StopIteration as stop:
                    results[k] = stop.value
    for want, got in zip(alone, results, strict=True):
        assert torch.equal(want, got)
