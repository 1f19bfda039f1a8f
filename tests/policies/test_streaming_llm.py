"""StreamingLLM on tiny models: equivalence to full, what eviction keeps, cache-mode positions."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.sink_window_cache import SinkWindowLayer
from tests.policies.helpers import full_logits, new_session, run_prefill
from tests.tiny_models import make_tiny


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_eviction_keeps_sinks_and_last_window(tiny_llama, positions):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 150))
    ref = new_session("full", info)
    run_prefill(ref, runner, ids)
    session = new_session("streaming_llm", info, sink_tokens=4, window=32, positions=positions)
    run_prefill(session, runner, ids)
    for layer in session.cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 36
    # layer-0 values depend on the token alone, so they identify which tokens were kept
    full_values = ref.cache.layers[0].values
    expected = torch.cat([full_values[..., :4, :], full_values[..., -32:, :]], dim=-2)
    torch.testing.assert_close(session.cache.layers[0].values, expected)
    stats = session.stats()
    assert stats.tokens_seen == 150 and stats.tokens_kept == 36
    assert stats.kv_bytes_kept < stats.kv_bytes_full


def test_cache_mode_positions_are_contiguous_slots(tiny_llama):
    model, info, runner = tiny_llama
    session = new_session("streaming_llm", info, sink_tokens=2, window=10)
    run_prefill(session, runner, torch.randint(0, 256, (1, 40)))
    # 12 slots held; the next token is placed at slot 12 whatever the absolute position
    assert session.cache.get_seq_length() == 12
    assert session.next_position_ids(3).tolist() == [[12, 13, 14]]
    original = new_session("streaming_llm", info, sink_tokens=2, window=10, positions="original")
    run_prefill(original, runner, torch.randint(0, 256, (1, 40)))
    assert original.next_position_ids(1).tolist() == [[40]]


def test_cache_mode_equals_recompute_with_contiguous_positions():
    """One layer: KV depend on the token alone, so after eviction cache mode must equal a fresh
    dense run over the kept tokens placed at 0..L-1 (the paper's re-positioning)."""
    model, info, runner = make_tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 256, (1, 60))
    session = new_session("streaming_llm", info, sink_tokens=3, window=20)
    for start in range(0, 60):  # one token at a time, as the paper's perplexity evaluation
        logits = runner.forward(session, ids[:, start : start + 1])[0, -1]
    kept = torch.cat([ids[:, :3], ids[:, 60 - 20 : 60]], dim=1)
    # the last forward saw the 23 kept tokens plus itself before evicting: recompute that view
    view = torch.cat([ids[:, :3], ids[:, 60 - 21 : 60]], dim=1)
    torch.testing.assert_close(logits, full_logits(model, view)[-1], atol=2e-5, rtol=1e-4)
    assert kept.shape[1] == session.cache.get_seq_length()


def test_chunked_prefill_keeps_positions_within_sinks_plus_window(tiny_llama):
    """Before each prefill chunk the cache makes room for it (the reference's evict_for_space): every
    prefill forward attends at most sinks + window keys, at cache positions below sinks + window."""
    model, info, runner = tiny_llama
    session = new_session("streaming_llm", info, sink_tokens=4, window=32, prefill_chunk=16)
    seen = []
    attention = session.attention

    def spy(call):
        seen.append((call.key.shape[2], int(call.position_ids.max())))
        return attention(call)

    session.attention = spy
    run_prefill(session, runner, torch.randint(0, 256, (1, 150)))
    assert max(keys for keys, _ in seen) == 36 and max(pos for _, pos in seen) == 35
    assert session.cache.get_seq_length() == 36


def test_chunked_prefill_equals_recompute_of_the_kept_view():
    """One layer: the last chunk's logits equal a dense run over the sinks + the last window - chunk
    tokens before it + the chunk itself, at positions 0..L-1."""
    model, info, runner = make_tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 256, (1, 60))
    session = new_session("streaming_llm", info, sink_tokens=3, window=20, prefill_chunk=8)
    logits = run_prefill(session, runner, ids)  # chunks of 8, the last one of 4 tokens
    view = torch.cat([ids[:, :3], ids[:, 56 - 16 : 60]], dim=1)
    torch.testing.assert_close(logits, full_logits(model, view)[-1], atol=2e-5, rtol=1e-4)


def test_ring_layer_holds_what_concatenation_holds():
    """Prompt chunks, then one token at a time: after every eviction the live keys (in logical order)
    are the sinks + the last window; every decode step attends exactly those plus the new token;
    slot positions give each physical slot its logical place; a snapshot undoes a step."""
    sinks, window = 2, 5
    layer = SinkWindowLayer(sinks, window)
    tokens = torch.arange(200, dtype=torch.float32)
    seen: list[float] = []

    def feed(values):
        kv = values.view(1, 1, -1, 1)
        keys, _ = layer.update(kv, kv)
        seen.extend(values.tolist())
        return keys.flatten()

    feed(tokens[:7])
    layer.evict()
    feed(tokens[7:16])  # a chunk longer than the window
    layer.evict()
    for t in range(16, 40):
        attended = feed(tokens[t : t + 1])
        assert sorted(attended.tolist()) == seen[:sinks] + seen[-(window + 1) :]
        ordered = torch.empty_like(attended)
        ordered[layer.slot_positions(attended.device)] = attended
        assert ordered.tolist() == seen[:sinks] + seen[-(window + 1) :]
        layer.evict()
        assert layer.keys.flatten().tolist() == seen[:sinks] + seen[-window:]
        assert layer.get_seq_length() == sinks + window
    snapshot = layer.snapshot()
    feed(tokens[40:41])
    layer.restore(snapshot)
    seen.pop()
    assert layer.keys.flatten().tolist() == seen[:sinks] + seen[-window:]
    feed(tokens[41:44])  # a multi-token forward after ring steps puts the slots back in order first
    assert layer.keys.flatten().tolist() == seen[:sinks] + seen[-(window + 3) :]
