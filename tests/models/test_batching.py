"""Batched decode across sessions (full and StreamingLLM in both position modes) equals one-by-one decode."""

from __future__ import annotations

import torch

from tests.policies.helpers import new_session, run_prefill


def _sessions(info):
    return [
        new_session("full", info),
        new_session("streaming_llm", info, sink_tokens=2, window=20),
        new_session("streaming_llm", info, sink_tokens=2, window=20, positions="original"),
        new_session("full", info),
    ]


def test_batched_decode_matches_single_decode(tiny):
    model, info, runner = tiny
    prompts = [torch.randint(0, 256, (1, n)) for n in (30, 45, 12, 7)]
    single, batched = _sessions(info), _sessions(info)
    for group in (single, batched):
        for session, ids in zip(group, prompts, strict=True):
            run_prefill(session, runner, ids)
    tokens = [[int(t) for t in torch.randint(0, 256, (4,))] for _ in range(6)]
    for step in tokens:
        expected = torch.stack([s.decode(runner, t) for s, t in zip(single, step, strict=True)])
        got = runner.decode_batch(batched, step)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    for a, b in zip(single, batched, strict=True):
        assert a.stats().tokens_kept == b.stats().tokens_kept
        assert a.tokens_seen == b.tokens_seen
