"""Full attention: the kvmux attention path equals stock transformers, chunked or not."""

from __future__ import annotations

import torch

from tests.policies.helpers import full_logits, new_session, run_prefill, stepwise_logits


def test_chunked_prefill_equals_one_shot(tiny):
    model, info, runner = tiny
    ids = torch.randint(0, 256, (1, 100))
    reference = full_logits(model, ids)
    for chunk in (1, 7, 64, 100):
        session = new_session("full", info)
        torch.testing.assert_close(stepwise_logits(session, runner, ids, chunk), reference, atol=2e-5, rtol=1e-4)
        assert session.stats().tokens_kept == 100 == session.stats().tokens_seen


def test_kvmux_attention_equals_sdpa(tiny_llama):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 50))
    ours = full_logits(model, ids)
    model.set_attn_implementation("sdpa")
    try:
        stock = full_logits(model, ids)
    finally:
        model.set_attn_implementation("kvmux")
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def greedy_session_and_stock(tiny_llama, prompt_tokens: int, steps: int):
    """A `full` session's greedy tokens after a random prompt, and stock transformers' for the same prompt."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, prompt_tokens))
    session = new_session("full", info)
    logits, tokens = run_prefill(session, runner, ids), []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = session.decode(runner, tokens[-1])
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, pad_token_id=0)
    finally:
        model.set_attn_implementation("kvmux")
    return session, tokens, out[0, prompt_tokens:].tolist()


def test_session_prefill_and_decode_match_transformers_generate(tiny_llama):
    """The whole session path (runner, cache, hook, decode) generates what stock transformers does."""
    session, tokens, stock = greedy_session_and_stock(tiny_llama, 40, 12)
    assert tokens == stock
    assert session.stats().tokens_seen == 40 + 12  # each generated token was fed back


def test_split_kv_decode_generates_what_transformers_does(tiny_llama, monkeypatch):
    """Decode rows split into key windows (forced on the tiny model) keep the greedy tokens of stock generate."""
    import kvmux.policies.dense as dense
    import kvmux.policies.split_decode as split

    monkeypatch.setattr(split, "MIN_KEYS_PER_PART", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # 2 KV heads on 4 threads: 2 windows each
    used = []
    monkeypatch.setattr(dense, "split_decode", lambda *a: used.append(a[-1]) or split.split_decode(*a))
    _, tokens, stock = greedy_session_and_stock(tiny_llama, 45, 8)
    assert used and set(used) == {2}
    assert tokens == stock
