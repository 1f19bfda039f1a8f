"""ActQKV: equivalence to full, the block memory, representatives, Activation Bias, the budget, retrieval."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from kvmux.cli_args import default_presets_dir
from kvmux.evals.quality.backends import EngineBackend
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.policies.actqkv.block_budget import BlockBudget
from kvmux.policies.actqkv.context_memory import ActivationStats, ContextMemory
from kvmux.policies.actqkv.params import ActQKVParams
from kvmux.policies.actqkv.session import ActQKVSession
from kvmux.policies.base import AttentionCall, PolicyInputError, SessionRequest
from kvmux.policies.dense import attention_probs
from kvmux.policies.presets import load_presets
from kvmux.policies.registry import get_policy
from kvmux.policies.rope import rotate
from kvmux.server.engine import Engine
from tests.policies.helpers import full_logits, new_session, run_prefill, stepwise_logits
from tests.tiny_models import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

SMALL = dict(n_init=8, n_local=32, block_size=8, window=16)


@pytest.mark.parametrize("positions", ["absolute", "ordered"])
def test_budget_covering_everything_reproduces_full(tiny, positions):
    """With every block retrieved, `ordered` slots are the absolute positions: exactly full."""
    model, info, runner = tiny
    ids = torch.randint(0, 256, (1, 200))
    session = new_session("actqkv", info, **SMALL, topk=100, min_blocks=0, positions=positions)
    prompt = stepwise_logits(session, runner, ids[:, :150], chunk=40)  # windows straddle forwards
    decoded = stepwise_logits(session, runner, ids[:, 150:], chunk=1)
    torch.testing.assert_close(torch.cat([prompt, decoded]), full_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert session.stats().extra["blocks"] == (200 - 8 - 32) // 8


def test_inf_llm_positions_are_exact_inside_the_local_window(tiny):
    model, info, runner = tiny
    ids = torch.randint(0, 256, (1, 60))
    session = new_session("actqkv", info, n_init=4, n_local=64, block_size=8, window=16)
    got = stepwise_logits(session, runner, ids, chunk=20)
    torch.testing.assert_close(got, full_logits(model, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["inf_llm", "absolute", "ordered"])
def test_global_tokens_all_sit_at_distance_n_local(positions):
    """One layer: k/v depend on the token alone. Swapping two retrieved blocks changes nothing under
    the InfLLM scheme (every global key is n_local away) but does with absolute or ordered positions."""
    model, info, runner = make_tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 256, (1, 120))
    swapped = ids.clone()
    swapped[:, 8:16], swapped[:, 24:32] = ids[:, 24:32], ids[:, 8:16]
    last = []
    for seq in (ids, swapped):
        session = new_session("actqkv", info, **SMALL, topk=100, min_blocks=0, positions=positions)
        last.append(run_prefill(session, runner, seq))
    same = torch.allclose(last[0], last[1], atol=1e-5)
    assert same == (positions == "inf_llm")


def test_ordered_positions_close_the_gaps_left_by_unretrieved_blocks(monkeypatch):
    """One layer: k/v depend on the token alone. With blocks 1 and 3 never retrieved, the last token
    under `ordered` positions computes exactly what full attention computes on the prompt without
    those blocks' tokens: the attended keys sit at consecutive positions in their original order."""
    model, info, runner = make_tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 256, (1, 120))
    original = ActQKVSession._select

    def all_but_blocks_1_and_3(self, mem, layer, window_idx, probe_q, decoding):
        original(self, mem, layer, window_idx, probe_q, decoding)
        if mem.num_blocks == 0:
            return None
        return torch.tensor([b for b in range(mem.num_blocks) if b not in (1, 3)], dtype=torch.long)

    monkeypatch.setattr(ActQKVSession, "_select", all_but_blocks_1_and_3)
    session = new_session("actqkv", info, **SMALL, positions="ordered")
    last = run_prefill(session, runner, ids)
    # n_init 8, blocks of 8: block b holds tokens 8 + 8b .. 15 + 8b
    kept = [t for t in range(120) if not (16 <= t < 24 or 32 <= t < 40)]
    torch.testing.assert_close(last.float(), full_logits(model, ids[:, kept])[-1], atol=2e-5, rtol=1e-4)
    session = new_session("actqkv", info, **SMALL, positions="absolute")
    # true positions leave the gaps open: the keys before them sit further away (10x the tolerance)
    gap_kept = run_prefill(session, runner, ids).float() - full_logits(model, ids[:, kept])[-1]
    assert gap_kept.abs().max() > 2e-4


def test_model_runs_at_position_zero_and_context_limit(tiny_llama):
    model, info, runner = tiny_llama
    session = new_session("actqkv", info)
    assert session.next_position_ids(3).tolist() == [[0, 0, 0]]
    policy = get_policy("actqkv")
    assert policy.context_limit(ActQKVParams(), info) is None
    assert policy.context_limit(ActQKVParams(positions="absolute"), info) == info.max_context
    assert policy.context_limit(ActQKVParams(positions="ordered"), info) is None
    with pytest.raises(ValidationError):
        ActQKVParams(window=600, n_local=512)


def test_memory_layout_after_feeding_tokens(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 100))
    ref = new_session("full", info)
    run_prefill(ref, runner, ids)
    session = new_session("actqkv", info, **SMALL)
    run_prefill(session, runner, ids)
    mem = session.cache.layers[0]
    # init: tokens 0..7; blocks while recent - 8 >= 32: (100 - 8 - 32) // 8 = 7; recent: the last 36
    assert mem.init_k.shape[1] == 8 and mem.num_blocks == 7 and mem.recent_len == 36
    assert mem.recent_start == 64 and mem.tokens_held == 100
    # layer-0 values depend on the token alone; keys are stored un-rotated
    values = ref.cache.layers[0].values[0]
    keys = rotate(ref.cache.layers[0].keys[0], -torch.arange(100), info.inv_freq)
    blocks_v = mem.blk_v[:, :7].reshape(values.shape[0], -1, values.shape[-1])
    blocks_k = mem.blk_k[:, :7].reshape(keys.shape[0], -1, keys.shape[-1])
    torch.testing.assert_close(torch.cat([mem.init_v, blocks_v, mem.rec_v], dim=1), values)
    torch.testing.assert_close(torch.cat([mem.init_k, blocks_k, mem.rec_k], dim=1), keys, atol=1e-5, rtol=1e-4)
    every_k, every_v = mem.gather_blocks(torch.arange(7))  # all blocks: views of the store
    torch.testing.assert_close(every_k, blocks_k)
    torch.testing.assert_close(every_v, blocks_v)
    some_k, _ = mem.gather_blocks(torch.tensor([1, 4]))
    torch.testing.assert_close(some_k, torch.cat([blocks_k[:, 8:16], blocks_k[:, 32:40]], dim=1))
    stats = session.stats()
    assert stats.tokens_seen == stats.tokens_kept == 100 and stats.extra["blocks"] == 7
    assert stats.kv_bytes_kept >= stats.kv_bytes_full  # nothing is evicted, representatives come on top


def test_local_scores_are_the_attention_each_key_received():
    """Inside the local window the accumulated score of key j is sum_i p(i, j) of dense causal attention."""
    model, info, runner = make_tiny("llama", num_hidden_layers=1)
    session = new_session("actqkv", info, n_init=4, n_local=64, block_size=8, window=16)
    seen = {}
    inner = session.attention

    def spy(call):
        seen["q"], seen["k"] = call.query, call.key
        return inner(call)

    session.attention = spy
    runner.forward(session, torch.randint(0, 256, (1, 40)))
    pos = torch.arange(40)
    q, k = rotate(seen["q"], pos, info.inv_freq), rotate(seen["k"], pos, info.inv_freq)
    probs = attention_probs(q, k, model.model.layers[0].self_attn.scaling)
    torch.testing.assert_close(session.cache.layers[0].rec_score, probs[0].sum(dim=1), atol=1e-5, rtol=1e-4)


def test_representative_is_mean_of_most_attended_keys():
    torch.manual_seed(0)
    heads, kv_heads, dim, bs, topk = 4, 2, 6, 8, 3
    mem = ContextMemory(0, 4, bs, topk, heads, ActivationStats(0, 10))
    keys, values = torch.randn(1, kv_heads, bs + 4, dim), torch.randn(1, kv_heads, bs + 4, dim)
    mem.update(keys, values)
    mem.append(keys[0], values[0])
    scores = torch.rand(heads, bs + 4)
    mem.add_local_scores(scores)
    mem.advance()
    assert mem.num_blocks == 1 and mem.recent_len == 4
    expected = []
    for h in range(heads):
        order = sorted(range(bs), key=lambda j: -scores[h, j].item())[:topk]
        expected.append(torch.stack([keys[0, h // (heads // kv_heads), j] for j in order]).mean(dim=0))
    torch.testing.assert_close(mem.reprs[0], torch.cat(expected))


def test_activation_bias_weights_on_constructed_input():
    h = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.9, 0.0], [5.0, -3.0, 2.0], [0.0, 1.1, 0.1]])
    stats = ActivationStats(warmup=0, horizon=1000)
    weights = stats.weights(h)
    mu, var = h.mean(0), h.var(0, unbiased=False)
    bias = ((h - mu) ** 2 / (var + var.mean() / 100 + 1e-12)).mean(1)
    torch.testing.assert_close(weights, bias / bias.sum())
    assert weights.argmax().item() == 2 and weights[2] > 0.7
    warming = ActivationStats(warmup=1, horizon=1000)
    assert torch.allclose(warming.weights(h), torch.full((4,), 0.25))
    # equal-size windows merged with one unit each = statistics of their union
    other = torch.randn(4, 3) * 2 + 1
    warming.update(other)
    both = torch.cat([h, other])
    torch.testing.assert_close(warming.mean, both.mean(0))
    torch.testing.assert_close(warming.var, both.var(0, unbiased=False))


def test_budget_allocator_conserves_pool_and_respects_clamps():
    layers, topk = 4, 5
    budget = BlockBudget(layers, topk, min_blocks=3, history=2)
    flat, peaked = torch.zeros(40), torch.cat([torch.tensor([12.0]), torch.zeros(39)])
    budget.start_forward(1)
    ks = [budget.take(layer, 0, flat, entropy_split=False) for layer in range(layers)]
    assert ks == [5, 5, 5, 5] and budget.pools[0] == 0  # equal split of topk*layers
    for _ in range(2):  # history: layers 0 and 2 spread out, 1 and 3 concentrated
        budget.start_forward(1)
        for layer in range(layers):
            budget.take(layer, 0, flat if layer % 2 == 0 else peaked, entropy_split=True)
    budget.start_forward(1)
    ks = [budget.take(layer, 0, flat, entropy_split=True) for layer in range(layers)]
    # w_l = mean entropy / remaining sum; layer 3 is lifted to the floor (the pool is overdrawn by it)
    assert ks == [10, 3, 7, 3] and budget.pools[0] == -3
    # clamps: fewer blocks than the floor -> all of them; never above 2*topk
    budget.start_forward(1)
    assert budget.take(0, 0, torch.zeros(2), entropy_split=False) == 2
    assert budget.take(1, 0, torch.zeros(1), entropy_split=False) == 1
    wide = BlockBudget(2, topk=3, min_blocks=0, history=5)
    wide.start_forward(1)
    wide.pools[0] = 100.0
    assert wide.take(0, 0, flat, entropy_split=False) == 6


def _planted_session(info, question=None):
    """Layer-0 memory of random keys where block 3 holds copies of direction u; returns (session, u)."""
    session = new_session("actqkv", info, n_init=4, n_local=16, block_size=4, window=8, topk=1, min_blocks=1)
    torch.manual_seed(1)
    kv_heads, dim, heads = info.num_kv_heads, info.head_dim, info.num_heads
    u = torch.randn(kv_heads, 1, dim) * 4
    keys = torch.randn(kv_heads, 64, dim) * 0.1
    keys[:, 4 + 3 * 4 : 4 + 4 * 4] = u  # the tokens of block 3
    values = torch.randn(kv_heads, 64, dim)
    mem = session.cache.layers[0]
    mem.update(keys[None, :, :1], values[None, :, :1])
    for start in range(0, 64, 8):
        query = torch.randn(1, heads, 8, dim) * 0.1
        session.attention(
            AttentionCall(0, query, keys[None, :, start : start + 8], values[None, :, start : start + 8], None, 0.25)
        )
    if question is not None:
        mem.question = question
    return session, mem, u


@pytest.mark.parametrize("decoding", [True, False])
def test_retrieval_picks_the_planted_block(tiny_llama, decoding):
    model, info, runner = tiny_llama
    session, mem, u = _planted_session(info)
    assert mem.num_blocks == 11
    picked = []
    gather = mem.gather_blocks
    mem.gather_blocks = lambda idx: picked.append(idx.tolist()) or gather(idx)
    groups = info.num_heads // info.num_kv_heads
    q = rotate(u.repeat_interleave(groups, dim=0), torch.tensor([-16]), info.inv_freq)  # probe = u
    n = 1 if decoding else 2
    new = torch.zeros(1, info.num_kv_heads, n, info.head_dim)
    session.attention(AttentionCall(0, q.expand(-1, n, -1)[None], new, new, None, 0.25))
    assert 3 in picked[0] and len(picked[0]) <= 2


def test_question_term_steers_the_prompt_not_decoding(tiny_llama):
    model, info, runner = tiny_llama
    session, mem, u = _planted_session(info)
    question = mem.reprs[7].clone()  # the question points at block 7; the probe at block 3
    mem.question = question
    groups = info.num_heads // info.num_kv_heads
    q = rotate(u.repeat_interleave(groups, dim=0), torch.tensor([-16]), info.inv_freq)[None]
    picked = []
    gather = mem.gather_blocks
    mem.gather_blocks = lambda idx: picked.append(idx.tolist()) or gather(idx)
    for prefilling in (True, False):  # a one-token prompt window, then a decoding step
        session.prefilling = prefilling
        new = torch.zeros(1, info.num_kv_heads, 1, info.head_dim)
        session.attention(AttentionCall(0, q, new, new, None, 0.25))
    assert 7 in picked[0] and 7 not in picked[1] and 3 in picked[1]


def test_prompt_phase_follows_the_session_not_the_chunk_length(tiny_llama):
    """A prompt whose last prefill chunk is one token long still reads that chunk as prompt (question
    term on, no entropy split); only the tokens after the prefill decode."""
    model, info, runner = tiny_llama
    session = new_session("actqkv", info, **SMALL)
    phases = []
    select = session._select
    session._select = lambda mem, layer, idx, probe_q, decoding: (
        phases.append(decoding) or select(mem, layer, idx, probe_q, decoding)
    )
    chunk = session.prefill_chunk_tokens(runner)
    run_prefill(session, runner, torch.randint(0, 256, (1, chunk + 1)))  # the last chunk: one token
    prompt_calls = len(phases)
    assert prompt_calls and not any(phases)
    session.decode(runner, 5)
    assert len(phases) > prompt_calls and all(phases[prompt_calls:])


def test_question_vector_from_kv_policy_query(tiny_llama):
    model, info, runner = tiny_llama

    class Chars:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 256 for c in text]

    with_tok = dataclasses.replace(info, tokenizer=Chars())
    session = new_session("actqkv", with_tok, SessionRequest(query_text="what is the key?"), **SMALL)
    run_prefill(session, runner, torch.randint(0, 256, (1, 50)))
    assert session.tokens_seen == 50 and session.cache.layers[0].tokens_held == 50
    for mem in session.cache.layers:
        assert mem.question is not None and mem.question.shape == (info.num_heads * info.head_dim,)
    no_tok = new_session("actqkv", info, SessionRequest(query_text="what?"), **SMALL)
    with pytest.raises(PolicyInputError):
        run_prefill(no_tok, runner, torch.randint(0, 256, (1, 10)))


def test_attended_keys_per_query_stay_bounded_as_the_prompt_grows(tiny_llama):
    model, info, runner = tiny_llama
    params = dict(n_init=4, n_local=32, block_size=8, window=16, topk=2, min_blocks=1)
    means = []
    for length in (512, 1024):
        session = new_session("actqkv", info, **params)
        run_prefill(session, runner, torch.randint(0, 256, (1, length)))
        extra = session.stats().extra
        means.append(extra["attended_keys_mean"])
        # init + local window + at most 2*topk blocks + remainder (< block + window)
        assert extra["attended_keys_max"] <= 4 + 32 + 2 * 2 * 8 + 8 + 16
    assert abs(means[1] - means[0]) / means[0] < 0.1  # full attention would double


@pytest.mark.model
def test_embedded_model_retrieves_a_passkey_beyond_the_local_window(smollm):
    sample = get_task("passkey").make(Renderer(smollm.tokenizer), 1500, 30.0, 0, seed=3, max_new_tokens=6)
    params = dict(n_init=32, n_local=256, block_size=32, window=128, topk=4, min_blocks=2)
    engine = Engine(smollm, load_presets(default_presets_dir()), prefill_chunk_tokens=1024)
    # the question goes to the policy: the last prompt window needs the question term
    out = EngineBackend(engine).generate(sample, {"preset": "actqkv", "query": sample.query, **params})
    assert sample.answers[0] in out.text
    assert out.kv["attended_keys_max"] <= 32 + 256 + 8 * 32 + 32 + 128 < sample.prompt_tokens


def test_dense_layers_sit_outside_the_pool():
    budget = BlockBudget(4, topk=5, min_blocks=0, history=2, dense=frozenset({1}))
    flat = torch.zeros(40)
    budget.start_forward(1)
    pooled = [0, 2, 3]  # layer 1 attends every block and is never asked
    ks = [budget.take(layer, 0, flat, entropy_split=False) for layer in pooled]
    assert ks == [5, 5, 5] and budget.pools[0] == 0  # the 3 pooled layers share 3 * topk
    for _ in range(2):  # the entropy split waits for the pooled layers' history only
        budget.start_forward(1)
        for layer in pooled:
            budget.take(layer, 0, flat, entropy_split=True)
    assert len(budget.history[1]) == 0
    budget.start_forward(1)
    assert [budget.take(layer, 0, flat, entropy_split=True) for layer in pooled] == [5, 5, 5]


def test_retrieval_layers_come_from_the_profile_and_attend_every_block(tiny_llama):
    from tests.policies.test_retrieval_heads import with_profile

    _, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 160))
    params = dict(SMALL, topk=1, min_blocks=1)
    profiled = with_profile(info, [(1, 0), (1, 3), (0, 2)])  # layer 1 has the best mean score
    session = new_session("actqkv", profiled, retrieval_layers=1, **params)
    picked: dict[int, list[list[int]]] = {0: [], 1: []}
    for layer in (0, 1):
        mem = session.cache.layers[layer]
        mem.gather_blocks = lambda idx, mem=mem, got=picked[layer]: (
            got.append(idx.tolist()) or type(mem).gather_blocks(mem, idx)
        )
    run_prefill(session, runner, ids)
    assert len(picked[1][-1]) > 2 and all(idx == list(range(len(idx))) for idx in picked[1])  # every block
    assert {len(idx) for idx in picked[0]} == {1}
    plain = new_session("actqkv", profiled, **params)
    run_prefill(plain, runner, ids)
    assert plain.stats().extra["blocks_last_step"][1] == 1
    with pytest.raises(PolicyInputError, match="kvmux calibrate") as error:
        new_session("actqkv", info, retrieval_layers=1, **params)
    assert error.value.param == "kv_policy.retrieval_layers" and error.value.status == 400
    pol = get_policy("actqkv")
    with pytest.raises(PolicyInputError):
        pol.check_prompt(pol.Params(retrieval_layers=1), info, SessionRequest(), [1, 2, 3])
    with pytest.raises(PolicyInputError, match="exceeds the model's"):
        new_session("actqkv", profiled, retrieval_layers=info.num_layers + 1, **params)


def test_a_retrieval_layer_counts_every_key_in_the_step_estimate(tiny_llama):
    _, info, _ = tiny_llama
    pol = get_policy("actqkv")
    plain = pol.step_bytes_needed(pol.Params(), info, 50_000, 2048)
    dense = pol.step_bytes_needed(pol.Params(retrieval_layers=1), info, 50_000, 2048)
    assert dense > 5 * plain  # a window reads all 50K keys in that layer, not ~2K
