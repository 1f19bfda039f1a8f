"""ActQKV's question source (`question`): kv_policy.query, the prompt's trailing paragraph, or none."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmux.cli_args import default_presets_dir
from kvmux.evals.quality.backends import EngineBackend
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.policies.actqkv.question import question_tokens_bound
from kvmux.policies.base import SessionRequest
from kvmux.policies.presets import PresetError, load_presets, resolve_request_policy
from kvmux.policies.registry import get_policy
from kvmux.server.engine import Engine
from tests.policies.helpers import ByteTokenizer, new_session, run_prefill

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

TOK = ByteTokenizer()
SMALL = dict(n_init=8, n_local=32, block_size=8, window=16)
HEAD, TAIL = "<sys>be brief</sys>\n<user>\n", "</user>\n<assistant>\n"
DOCUMENT = "".join(f"Line {i} holds the value {i * 7}.\n" for i in range(8))
QUESTION = "Which line holds 42?"


@pytest.fixture(scope="module")
def tiny_bytes(tiny_llama):
    """The tiny Llama with a byte tokenizer (one token per byte, its 256-token vocabulary)."""
    _, info, runner = tiny_llama
    return dataclasses.replace(info, tokenizer=TOK), runner


def _completion(text: str, query: str | None = None) -> tuple[torch.Tensor, SessionRequest]:
    return torch.tensor([TOK.encode(text)]), SessionRequest(query_text=query, prompt_text=text)


def _chat(content: str, query: str | None = None) -> tuple[torch.Tensor, SessionRequest]:
    prompt = HEAD + content + TAIL
    messages = [{"role": "user", "content": content}]
    return torch.tensor([TOK.encode(prompt)]), SessionRequest(query_text=query, prompt_text=prompt, messages=messages)


def _questions(tiny_bytes, ids: torch.Tensor, request: SessionRequest, **params):
    """(each layer's question vector or None, the session's stats) after reading the prompt."""
    info, runner = tiny_bytes
    session = new_session("actqkv", info, request, **SMALL, **params)
    run_prefill(session, runner, ids)
    assert session.tokens_seen == ids.shape[1]  # the question is not counted as request tokens
    return [mem.question for mem in session.cache.layers], session.stats().extra


def _assert_same_vectors(got: list, want: list) -> None:
    assert all(g is not None for g in got) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("make", [_completion, _chat])
def test_auto_finds_the_trailing_paragraph_as_kv_policy_query_would_give_it(tiny_bytes, make):
    ids, request = make(DOCUMENT + "\n" + QUESTION)
    found, stats = _questions(tiny_bytes, ids, request)
    assert stats["question"] == "after_last_blank_line" and stats["question_tokens"] == len(QUESTION)
    ids, with_query = make(DOCUMENT + "\n" + QUESTION, query=QUESTION)
    given, stats = _questions(tiny_bytes, ids, with_query)
    assert stats["question"] == "query"
    _assert_same_vectors(found, given)


def test_auto_keeps_the_last_max_question_tokens(tiny_bytes):
    ids, request = _completion(DOCUMENT + QUESTION)  # no blank line: the last line
    found, stats = _questions(tiny_bytes, ids, request, max_question_tokens=8)
    assert (stats["question"], stats["question_tokens"]) == ("last_line_tail", 8)
    ids, with_query = _completion(DOCUMENT + QUESTION, query=QUESTION[-8:])
    _assert_same_vectors(found, _questions(tiny_bytes, ids, with_query)[0])
    # a longer prompt question: a different vector
    longer, _ = _questions(tiny_bytes, *_completion(DOCUMENT + QUESTION))
    assert not torch.equal(longer[0], found[0])


def test_query_given_wins_over_the_prompt_under_auto(tiny_bytes):
    ids, request = _completion(DOCUMENT + "\n" + QUESTION, query="Line 3?")
    _, stats = _questions(tiny_bytes, ids, request)
    assert (stats["question"], stats["question_tokens"]) == ("query", len("Line 3?"))


@pytest.mark.parametrize(
    ("question", "query", "built"),
    [("off", None, False), ("off", QUESTION, False), ("query", None, False), ("query", QUESTION, True)],
)
def test_off_never_and_query_only_with_kv_policy_query(tiny_bytes, question, query, built):
    ids, request = _completion(DOCUMENT + "\n" + QUESTION, query=query)
    vectors, stats = _questions(tiny_bytes, ids, request, question=question)
    assert all((v is not None) == built for v in vectors)
    assert stats["question"] == ("query" if built else "none")


def test_auto_without_a_line_break_or_a_tokenizer_builds_none(tiny_llama, tiny_bytes):
    vectors, stats = _questions(tiny_bytes, *_completion("One line only, what is 42?"))
    assert all(v is None for v in vectors) and stats["question_tokens"] == 0
    _, info, runner = tiny_llama  # no tokenizer: nothing to decode the prompt with
    session = new_session("actqkv", info, SessionRequest(), **SMALL)
    run_prefill(session, runner, torch.randint(0, 256, (1, 40)))
    assert all(mem.question is None for mem in session.cache.layers)


def test_bad_question_value_is_a_preset_error_naming_it():
    presets = load_presets(default_presets_dir())
    with pytest.raises(PresetError, match="question") as info:
        resolve_request_policy({"preset": "actqkv", "question": "always"}, presets, "full")
    assert "question" in (info.value.param or "")
    preset, _ = resolve_request_policy({"preset": "actqkv", "question": "off"}, presets, "full")
    assert preset.params.question == "off" and get_policy("actqkv").Params().question == "auto"


def test_step_estimate_counts_a_question_found_in_the_prompt(tiny_llama):
    _, info, _ = tiny_llama
    policy = get_policy("actqkv")

    def step(query_tokens: int = 0, **params) -> int:
        return policy.step_bytes_needed(policy.Params(**params), info, 1500, 64, query_tokens)

    params = policy.Params()
    assert question_tokens_bound(params, 1500, 0) == 1024 and question_tokens_bound(params, 300, 0) == 300
    assert question_tokens_bound(params, 3000, 50) == 50
    assert question_tokens_bound(policy.Params(question="query"), 3000, 0) == 0
    assert question_tokens_bound(policy.Params(question="off"), 3000, 50) == 0
    assert step() == step(1024, question="query") > step(question="off") == step(question="query")


@pytest.mark.model
def test_embedded_model_finds_the_passkey_with_the_question_found_in_a_plain_prompt(smollm):
    """The passkey sits outside the last windows: retrieval needs the question term (`off` misses it)."""
    sample = get_task("passkey").make(Renderer(smollm.tokenizer), 1500, 30.0, 0, seed=3, max_new_tokens=6)
    params = dict(n_init=32, n_local=256, block_size=32, window=128, topk=4, min_blocks=2)
    backend = EngineBackend(Engine(smollm, load_presets(default_presets_dir()), prefill_chunk_tokens=1024))
    found = backend.generate(sample, {"preset": "actqkv", **params})  # no kv_policy.query
    assert (found.kv["question"], found.kv["question_tokens"]) == ("last_line", 10)  # "What is the pass key? ..."
    assert sample.answers[0] in found.text
    off = backend.generate(sample, {"preset": "actqkv", "question": "off", **params})
    assert off.kv["question"] == "none" and sample.answers[0] not in off.text
