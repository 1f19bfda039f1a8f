"""Bounded steps: question scoring in pieces (ActQKV, InfiniRetri) equals the one-piece computation,
FlexPrefill's single pass is capped, parameter caps, and the per-step memory estimates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError

from kvmux.policies.actqkv import question as actqkv_question
from kvmux.policies.actqkv.context_memory import top_attended_mean
from kvmux.policies.actqkv.params import MAX_ATTENDED_KEYS, ActQKVParams
from kvmux.policies.base import AttentionCall, SessionRequest, dense_step_bytes
from kvmux.policies.dense import attention_probs
from kvmux.policies.infiniretri.scoring import question_rows
from kvmux.policies.presets import PresetError, resolve_request_policy
from kvmux.policies.registry import get_policy
from kvmux.policies.rope import rotate
from tests.policies.helpers import full_logits, new_session, run_prefill
from tests.tiny_models import make_tiny

SMALL = dict(n_init=8, n_local=32, block_size=8, window=16)


def _qkv(n: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, dim, generator=gen)
    k = torch.randn(kv_heads, n, dim, generator=gen)
    v = torch.randn(kv_heads, n, dim, generator=gen)
    return q, k, v


def _question_reference(session, q, k, v, scaling):
    """The one-piece computation: the full n x n causal softmax of the question over itself."""
    n, hkv = q.shape[1], k.shape[0]
    pos = torch.arange(n)
    qr, kr = rotate(q, pos, session.inv_freq).float(), rotate(k, pos, session.inv_freq).float()
    logits = (qr.reshape(hkv, -1, q.shape[-1]) @ kr.transpose(1, 2) * scaling).view(hkv, -1, n, n)
    probs = torch.softmax(logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), dim=-1)
    received = probs.sum(dim=2).reshape(q.shape[0], n)
    probe_q = rotate(q, torch.full((n,), session.params.n_local), session.inv_freq)
    question = top_attended_mean(probe_q, received, session.params.repr_topk).reshape(-1)
    out = (probs.reshape(hkv, -1, n) @ v.float()).view(q.shape[0], n, -1)
    return out, question


@pytest.mark.parametrize("piece_rows", [1, 5, 16, 37])
def test_actqkv_question_in_pieces_equals_one_piece(tiny_llama, piece_rows):
    _, info, _ = tiny_llama
    session = new_session("actqkv", info, **SMALL)
    mem = session.cache.layers[0]
    q, k, v = _qkv(37)
    out = session._question_attention(mem, q, k, v, 0.25, piece_rows=piece_rows)
    ref_out, ref_question = _question_reference(session, q, k, v, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem.question, ref_question, atol=1e-5, rtol=1e-5)


def test_actqkv_question_scores_stay_within_a_piece(tiny_llama, monkeypatch):
    """The largest score tensor is one piece of rows against the keys, not the whole n x n."""
    model, info, runner = tiny_llama
    monkeypatch.setattr(actqkv_question, "QUESTION_PIECE_ELEMENTS", 4 * 200 * 20)  # 20 rows of a 200-token question

    class Chars:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

    seen = []
    original = actqkv_question.grouped_probs

    def spy(q, k, scaling, mask):
        probs = original(q, k, scaling, mask)
        seen.append(probs.numel())
        return probs

    monkeypatch.setattr(actqkv_question, "grouped_probs", spy)
    request = SessionRequest(query_text="x" * 200)
    session = new_session("actqkv", dataclasses.replace(info, tokenizer=Chars()), request, **SMALL)
    session.encode_question(runner, torch.randint(0, 256, (1, 200)))
    assert len(seen) == info.num_layers * math.ceil(200 / 20)
    assert max(seen) <= info.num_heads * 20 * 200 < info.num_heads * 200 * 200


def test_actqkv_uses_the_query_ids_the_engine_checked(tiny_llama):
    _, info, runner = tiny_llama
    request = SessionRequest(query_text="what is the key?", query_ids=[5, 6, 7, 8])
    session = new_session("actqkv", info, request, **SMALL)  # no tokenizer: the ids are used as given
    run_prefill(session, runner, torch.randint(0, 256, (1, 40)))
    assert all(mem.question is not None for mem in session.cache.layers)


@pytest.mark.parametrize("piece_rows", [1, 3, 11])
def test_infiniretri_question_rows_in_pieces_equal_one_piece(piece_rows):
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 4, 30, 16, generator=gen), torch.randn(1, 2, 30, 16, generator=gen)
    call = AttentionCall(layer_idx=0, query=query, key=key, value=key.clone(), mask=None, scaling=0.25)
    ref = attention_probs(query[:, :, 19:], key, 0.25, None)[0].sum(0)
    torch.testing.assert_close(question_rows(call, 19, piece_rows), ref, atol=1e-6, rtol=1e-5)
    mask = torch.ones(1, 1, 30, 30, dtype=torch.bool).tril()
    masked = dataclasses.replace(call, mask=mask)
    torch.testing.assert_close(question_rows(masked, 19, piece_rows), ref, atol=1e-6, rtol=1e-5)


def test_flexprefill_long_prompt_is_prefilled_in_capped_forwards_ending_at_the_prompt_end():
    model, info, runner = make_tiny("llama")
    sizes = []
    forward = runner.forward

    def spy(session, ids, **kwargs):
        sizes.append(ids.shape[1])
        return forward(session, ids, **kwargs)

    runner.forward = spy
    ids = torch.randint(0, 256, (1, 300))
    # a budget covering every block: the sparse path is exact, so the split cannot change the logits
    session = new_session("flexprefill", info, block_size=16, min_budget=4096, max_single_pass_tokens=128)
    logits = run_prefill(session, runner, ids)
    assert sizes == [44, 128, 128] and session.stats().extra["prefill_forwards"] == 3
    torch.testing.assert_close(logits, full_logits(model, ids)[-1], atol=1e-4, rtol=1e-4)
    sizes.clear()
    run_prefill(new_session("flexprefill", info, block_size=16, max_single_pass_tokens=300), runner, ids)
    assert sizes == [300]  # up to the cap: one pass, as in the paper
    sizes.clear()
    run_prefill(new_session("flexprefill", info, block_size=16, prefill_chunk=100), runner, ids)
    assert sizes == [100, 100, 100]  # an explicit chunk keeps its meaning


# -- parameter caps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("actqkv", dict(window=513, n_local=1024)),
        ("actqkv", dict(n_local=4096, topk=1024)),  # every field in range, the keys per window over the cap
        ("streaming_llm", dict(window=131073)),
        ("lazy_eviction", dict(window=8193)),
        ("hip", dict(window=16385)),
        ("flexprefill", dict(max_single_pass_tokens=131073)),
        ("infiniretri", dict(max_question_tokens=4097)),
    ],
)
def test_params_beyond_their_caps_are_rejected(policy, params):
    with pytest.raises(ValidationError):
        get_policy(policy).Params(**params)


def test_actqkv_defaults_stay_under_the_keys_cap():
    assert ActQKVParams().attended_keys == 64 + 92 * 32 + 512 + 256 <= MAX_ATTENDED_KEYS


@pytest.mark.parametrize("spec", [{"preset": []}, {"preset": {}}, {"preset": 3}, {"preset": None}])
def test_non_string_preset_is_a_preset_error(spec):
    from pathlib import Path

    from kvmux.policies.presets import load_presets

    presets = load_presets(Path(__file__).resolve().parents[2] / "configs" / "policies")
    with pytest.raises(PresetError) as info:
        resolve_request_policy(spec, presets, "full")
    assert info.value.param == "kv_policy.preset"


# -- per-step memory estimates --------------------------------------------------------------------------


def _step(policy: str, info, num_tokens: int, chunk: int = 64, query_tokens: int = 0, **params) -> int:
    pol = get_policy(policy)
    return pol.step_bytes_needed(pol.Params(**params), info, num_tokens, chunk, query_tokens)


def test_default_step_is_one_chunk_of_dense_attention(tiny_llama):
    _, info, _ = tiny_llama
    assert _step("full", info, 1000, chunk=64) == dense_step_bytes(64, 1000) == 64 * 1000 * 5
    assert _step("full", info, 10, chunk=64) == dense_step_bytes(10, 10)


@pytest.mark.parametrize("policy", ["full", "streaming_llm", "lazy_eviction", "actqkv", "hip", "flexprefill"])
def test_step_estimates_grow_with_the_prompt(tiny_llama, policy):
    _, info, _ = tiny_llama
    sizes = [_step(policy, info, n) for n in (64, 1024, 16384)]
    assert 0 < sizes[0] <= sizes[1] <= sizes[2]


def test_actqkv_question_estimate_is_linear_in_the_question_per_piece(tiny_llama):
    """The question term is O(piece x n): a 40K-token question (what a 160 KB query used to ask for)
    would need 3 x Hq x n^2 fp32 in one piece; the estimate stays far below."""
    _, info, _ = tiny_llama
    n = 40_000
    one_piece = 3 * info.num_heads * n * n * 4
    with_question = _step("actqkv", info, 1000, query_tokens=n)
    assert _step("actqkv", info, 1000, query_tokens=0) < with_question < one_piece // 100
    no_question = _step("actqkv", info, 1000, question="query")  # auto would count a question found in the prompt
    assert _step("actqkv", info, 1000, query_tokens=n, question_weight=0.0) == no_question


def test_actqkv_window_estimate_covers_the_window_scores(tiny_llama):
    _, info, _ = tiny_llama
    small, large = _step("actqkv", info, 8192, window=64), _step("actqkv", info, 8192, window=512, n_local=512)
    assert large > small
    keys = ActQKVParams(window=512).attended_keys
    assert large >= 4 * info.num_heads * 512 * keys * 4  # four fp32 copies of one window's scores


def test_flexprefill_estimate_is_bounded_by_the_pass_cap(tiny_llama):
    _, info, _ = tiny_llama
    capped = _step("flexprefill", info, 65536, max_single_pass_tokens=8192)
    one_pass = _step("flexprefill", info, 65536, max_single_pass_tokens=65536)
    assert capped < one_pass
    assert one_pass >= 65536 * 65536  # the boolean mask of a whole-prompt pass


def test_streaming_llm_estimate_is_bounded_by_its_window(tiny_llama):
    _, info, _ = tiny_llama
    assert _step("streaming_llm", info, 10_000, window=256) == _step("streaming_llm", info, 1_000_000, window=256)


def test_infiniretri_estimate_is_bounded_by_the_model_context(tiny_llama):
    _, info, _ = tiny_llama
    assert _step("infiniretri", info, 10 * info.max_context) == _step("infiniretri", info, 100 * info.max_context)
