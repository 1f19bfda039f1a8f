"""StreamingLLM's cache-position decode steps from keys rotated once (`streaming_decode.py`) against
re-rotating every cached key to its slot at every step, as the prefill path does."""

from __future__ import annotations

import torch

from kvmux.policies.dense import sdpa
from kvmux.policies.rope import exact_cos_sin, rotate_with
from tests.policies.helpers import new_session, run_prefill


def _re_rotating(session):
    """The session with every decode step re-rotating its whole cache (the prefill path's attention)."""

    def attention(call):
        layer = session.cache.layers[call.layer_idx]
        keys = rotate_with(call.key, *session._slot_tables(layer, call.key.device))
        return sdpa(call.query, keys, call.value, call.mask, call.scaling)

    session.attention = attention
    return session


def _decode(session, runner, tokens):
    return torch.stack([runner.forward(session, torch.tensor([[t]]))[0, -1] for t in tokens])


def test_decode_steps_equal_re_rotating_every_key(tiny_llama):
    """Through the prefill hand-off, the window filling, many ring laps, a grown buffer, an undone step
    and an index far into a stream, every step's logits match the re-rotating path."""
    model, info, runner = tiny_llama
    prompt, tokens = torch.randint(0, 256, (1, 45)), torch.randint(0, 256, (70,)).tolist()
    params = dict(sink_tokens=4, window=16, prefill_chunk=8)
    fast = new_session("streaming_llm", info, **params)
    slow = _re_rotating(new_session("streaming_llm", info, **params))
    for session in (fast, slow):
        run_prefill(session, runner, prompt)
    torch.testing.assert_close(_decode(fast, runner, tokens[:30]), _decode(slow, runner, tokens[:30]))
    assert fast._rotated is not None and len(fast._rotated.mirrors) == info.num_layers
    # undo a step on both sides, then go on
    marks = [s.checkpoint() for s in (fast, slow)]
    seen = [s.tokens_seen for s in (fast, slow)]
    for session in (fast, slow):
        _decode(session, runner, tokens[30:31])
    for session, mark, count in zip((fast, slow), marks, seen, strict=True):
        session.restore(mark)
        session.tokens_seen = count
    fast.tokens_seen += 10**9  # the stream index only shifts every angle: scores are unchanged
    torch.testing.assert_close(_decode(fast, runner, tokens[31:]), _decode(slow, runner, tokens[31:]))


def test_sinks_only_and_a_window_of_one(tiny_llama):
    model, info, runner = tiny_llama
    prompt, tokens = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (12,)).tolist()
    for params in (dict(sink_tokens=0, window=3), dict(sink_tokens=6, window=1)):
        fast = new_session("streaming_llm", info, **params)
        slow = _re_rotating(new_session("streaming_llm", info, **params))
        for session in (fast, slow):
            run_prefill(session, runner, prompt)
        torch.testing.assert_close(_decode(fast, runner, tokens), _decode(slow, runner, tokens))


def test_exact_tables_rotate_far_positions_without_drift():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    near, far = (exact_cos_sin(torch.tensor([p]), inv_freq) for p in (5, 5 + 2**40))
    # far angles reduced in float64: cos/sin of p and of p + a multiple of every period differ only there
    cos_far, _ = far
    assert torch.all(cos_far.abs() <= 1) and not torch.allclose(near[0], cos_far)
    angle = torch.tensor([3 * 10**9], dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    torch.testing.assert_close(exact_cos_sin(torch.tensor([3 * 10**9]), inv_freq)[0][0, :8], angle.cos().float()[0])
