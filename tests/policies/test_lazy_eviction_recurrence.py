"""LazyEviction's recurrence recorder (TS/MRI, the score) and its `window: auto` calibration."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.base import AttentionCall
from kvmux.policies.lazy_eviction import policy as lazy_eviction
from kvmux.policies.lazy_eviction.eviction import percentile_from_counts
from kvmux.policies.lazy_eviction.recurrence import record_steps, recurrence_score
from tests.policies.helpers import new_session, run_prefill, stepwise_logits
from tests.policies.lazy_eviction_helpers import brute_force_score, prose, sharpen
from tests.tiny_models import make_tiny


def test_record_steps_hand_made_pattern():
    # tokens 0, 1 (prompt: TS 0); steps 1..6; token 2 arrives at step 1 (TS 0), token 3 at step 4 (TS 3)
    pattern = {1: [0, 2], 2: [0], 3: [1], 4: [0, 3], 5: [], 6: [1, 3]}  # step -> tokens attended >= alpha
    ts, mri = torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32)  # tokens 0-2
    for step, hits in pattern.items():
        if step == 4:
            ts = torch.cat([ts, torch.tensor([[3]], dtype=torch.int32)], dim=1)
            mri = torch.cat([mri, torch.zeros(1, 1, dtype=torch.int32)], dim=1)
        active = torch.zeros(1, ts.shape[1], 1, dtype=torch.bool)
        active[0, hits, 0] = True
        ts, mri = record_steps(ts, mri, active, step)
    # token 0: hits at 1, 2, 4 -> gaps 1, 1, 2; token 1: hits at 3, 6 -> gaps 3, 3
    # token 2: hit at 1 (TS 0) -> gap 1; token 3: arrives TS 3, hits at 4, 6 -> gaps 1, 2
    assert ts.tolist() == [[4, 6, 1, 6]] and mri.tolist() == [[2, 3, 1, 2]]


def test_record_steps_block_equals_step_by_step():
    torch.manual_seed(0)
    ts, mri = torch.randint(0, 5, (3, 40), dtype=torch.int32), torch.randint(0, 3, (3, 40), dtype=torch.int32)
    active = torch.rand(3, 40, 9) < 0.3
    block = record_steps(ts, mri, active, 6)
    seq_ts, seq_mri = ts, mri
    for r in range(9):
        seq_ts, seq_mri = record_steps(seq_ts, seq_mri, active[..., r : r + 1], 6 + r)
    assert torch.equal(block[0], seq_ts) and torch.equal(block[1], seq_mri)


def test_session_observes_hand_made_attention(tiny_llama):
    """Keys aligned with one query head's direction get all of that head's attention: only they
    are activated, in that query head only, and the recorder applies the update rule."""
    model, info, runner = tiny_llama
    session = new_session("lazy_eviction", info, budget=100, window=4, alpha=0.05)
    hq, hkv, dim = info.num_heads, info.num_kv_heads, info.head_dim
    key = torch.zeros(1, hkv, 6, dim)
    key[0, 0, 2, 0] = 1.0  # token 2 of KV head 0 points along dim 0
    key[0, 1, 4, 1] = 1.0  # token 4 of KV head 1 points along dim 1
    query = torch.zeros(1, hq, 1, dim)
    query[0, 0, 0, 0] = 60.0  # q head 0 (KV head 0) looks for dim 0
    query[0, 3, 0, 1] = 60.0  # q head 3 (KV head 1) looks for dim 1
    value = torch.randn(1, hkv, 6, dim)
    call = AttentionCall(layer_idx=0, query=query, key=key, value=value, mask=None, scaling=1.0)
    session.steps = 9  # this is decode step 10; tokens 0..4 arrived unobserved
    out = session.attention(call)
    torch.testing.assert_close(out[0, 0, 0], value[0, 0, 2], atol=1e-4, rtol=0)
    state = session.state[0]
    assert state.ts[0].tolist() == [9, 9, 10, 9, 9, 9]  # prompt tokens and the new token start at t-1
    assert state.mri[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert state.ts[3].tolist() == [9, 9, 9, 9, 10, 9] and state.mri[3].tolist() == [0, 0, 0, 0, 1, 0]
    # q heads 1 and 2 attend uniformly (zero query): 1/6 >= alpha everywhere
    assert state.ts[1].tolist() == [10] * 6 and state.mri[1].tolist() == [1] * 6


def test_prefill_calibration_observes_prompt_tail_like_decode_steps(tiny_llama):
    """Calibration replays the prompt's last rows through the decode recorder: its MRIs equal those
    of a session that prefilled the head of the prompt and decoded the tail, even when the tail
    straddles prefill chunks (the tiny runner prefills 64 tokens per forward)."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 150))
    calibrated = new_session("lazy_eviction", info, window="auto", alpha=0.008, calibration_rows=100)
    seen, set_window = [], calibrated.set_window_from

    def spy(states, source):
        seen.append([s.mri.clone() for s in states])
        set_window(states, source)

    calibrated.set_window_from = spy
    run_prefill(calibrated, runner, ids)
    decoded = new_session("lazy_eviction", info, window=1000, alpha=0.008)
    run_prefill(decoded, runner, ids[:, :50])
    stepwise_logits(decoded, runner, ids[:, 50:], chunk=7)
    for layer, mri in enumerate(seen[0]):
        assert torch.equal(mri, decoded.state[layer].mri)
    assert any(bool((mri > 1).any()) for mri in seen[0])  # varied recurrences were observed
    decoded.set_window_from(decoded.state, "decode")
    assert calibrated.window == decoded.window and calibrated.window_source == "prefill"


def test_observation_blocks_do_not_change_the_record(tiny_llama, monkeypatch):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 60))
    sessions = []
    for block_elements in (1 << 22, 1):  # one block per forward vs one query row per block
        monkeypatch.setattr(lazy_eviction, "BLOCK_ELEMENTS_DEFAULT", block_elements)
        session = new_session("lazy_eviction", info, window=1000, alpha=0.03)
        run_prefill(session, runner, ids[:, :20])
        sessions.append((stepwise_logits(session, runner, ids[:, 20:], chunk=20), session))
    torch.testing.assert_close(sessions[0][0], sessions[1][0])
    for a, b in zip(sessions[0][1].state, sessions[1][1].state, strict=True):
        assert torch.equal(a.ts, b.ts) and torch.equal(a.mri, b.mri)


def test_recurrence_score_prefers_short_recent_rhythms():
    ts = torch.tensor([[10, 10, 4, 3]], dtype=torch.int32)
    mri = torch.tensor([[1, 5, 1, 0]], dtype=torch.int32)
    score = recurrence_score(ts, mri, 10)[0].tolist()
    for j in range(4):
        assert score[j] == pytest.approx(brute_force_score(int(ts[0, j]), int(mri[0, j]), 10), abs=1e-6)
    # attended every step and just now > a 1-step rhythm quiet for 6 steps (H2 dominates) > a 5-step
    # rhythm attended just now > never attended (goes first)
    assert score[0] > score[2] > score[1] > score[3] == pytest.approx(0.0, abs=1e-6)


def test_percentile_from_counts():
    counts = torch.bincount(torch.tensor([1, 1, 2, 3, 3, 3, 5, 8, 8, 9]))
    assert percentile_from_counts(counts, 80) == 8  # 8 of 10 values are <= 8
    assert percentile_from_counts(counts, 50) == 3
    assert percentile_from_counts(counts, 100) == 9
    assert percentile_from_counts(torch.zeros(4, dtype=torch.long), 80) is None


def test_auto_window_from_prompt_tail_and_from_decode_stream():
    model, info, runner = make_tiny("llama", seed=1)
    sharpen(model, 4.0)
    ids = torch.randint(0, 256, (1, 120))
    session = new_session("lazy_eviction", info, budget=50, window="auto", alpha=0.02, calibration_rows=40)
    run_prefill(session, runner, ids)
    extra = session.stats().extra
    assert extra["window_source"] == "prefill" and 1 <= extra["window"] <= 40
    assert session._calib is None
    # a stream with no prompt calibrates from the decode state when the cache first exceeds B
    stream = new_session("lazy_eviction", info, budget=50, window="auto", alpha=0.02)
    for t in range(120):
        runner.forward(stream, ids[:, t : t + 1])
    extra = stream.stats().extra
    assert extra["window_source"] == "decode" and 1 <= extra["window"] <= 51 and extra["evictions"] > 0
    assert stream.stats().tokens_kept <= 50 + extra["window"]


@pytest.mark.model
def test_auto_window_on_embedded_model_is_sensible(smollm):
    runner = smollm.runner(1024)
    ids = smollm.tokenizer(prose(8000), return_tensors="pt").input_ids[:, :768]
    session = new_session("lazy_eviction", smollm.info, window="auto", calibration_rows=256)
    run_prefill(session, runner, ids)
    extra = session.stats().extra
    # natural text: recurrences span tens of steps (neither every step nor never)
    assert extra["window_source"] == "prefill" and 8 <= extra["window"] <= 256


def test_steps_in_arrears_equal_step_by_step():
    """observe_step (recorded every few steps, tokens arriving each step, the hit buffer growing)
    leaves the same TS/MRI as applying the reference update after every step."""
    from kvmux.policies.lazy_eviction.recurrence import RecurrenceState

    torch.manual_seed(1)
    heads, prompt, steps = 2, 5, 300  # 300 > the hit buffer's first capacity: it grows once
    lazy = RecurrenceState(heads, torch.device("cpu"), pending_rows=7)
    lazy.append(torch.zeros(prompt, dtype=torch.int32))
    ts, mri = lazy.ts.clone(), lazy.mri.clone()
    for step in range(1, steps + 1):
        probs = torch.rand(heads, prompt + step)
        lazy.observe_step(probs, 0.6, step)
        ts = torch.cat([ts, torch.full((heads, 1), step - 1, dtype=torch.int32)], dim=1)
        mri = torch.cat([mri, torch.zeros(heads, 1, dtype=torch.int32)], dim=1)
        ts, mri = record_steps(ts, mri, (probs >= 0.6)[..., None], step)
        if step in (3, 150):  # a read in the middle of a pending run flushes it
            assert torch.equal(lazy.ts, ts) and torch.equal(lazy.mri, mri)
    assert lazy.length == prompt + steps and lazy.flushes > steps // 7
    assert torch.equal(lazy.ts, ts) and torch.equal(lazy.mri, mri)


def test_rewind_undoes_pending_steps_and_refuses_after_a_flush():
    from kvmux.policies.lazy_eviction.recurrence import RecurrenceState

    torch.manual_seed(2)
    rows = [torch.rand(3, 4 + i) for i in range(1, 6)]
    clean = RecurrenceState(3, torch.device("cpu"), pending_rows=4)
    undone = RecurrenceState(3, torch.device("cpu"), pending_rows=4)
    for state in (clean, undone):
        state.append(torch.zeros(4, dtype=torch.int32))
        state.observe_step(rows[0], 0.5, 1)
    mark = undone.mark()
    undone.observe_step(torch.ones(3, 6), 0.5, 2)  # a step that failed part-way
    undone.rewind(mark)
    for step, probs in enumerate(rows[1:], start=2):
        clean.observe_step(probs, 0.5, step)
        undone.observe_step(probs, 0.5, step)
    assert torch.equal(clean.ts, undone.ts) and torch.equal(clean.mri, undone.mri)
    mark = undone.mark()
    undone.observe_step(torch.rand(3, 10), 0.5, 6)
    undone.flush()  # the record moved on: the mark no longer describes it
    with pytest.raises(RuntimeError, match="cannot be undone"):
        undone.rewind(mark)


def test_session_restore_undoes_a_step_that_failed_part_way(tiny_llama):
    """A decode step that raises in its second layer is undone by checkpoint/restore: the session
    then decodes (across the record's flushes and an eviction) exactly as one that never tried."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 40))
    sessions = []
    for fail in (False, True):
        session = new_session("lazy_eviction", info, budget=24, window=8, alpha=0.03)
        run_prefill(session, runner, ids[:, :20])
        logits = [session.decode(runner, int(t)) for t in ids[0, 20:25]]
        if fail:
            mark, attention = session.checkpoint(), session.attention

            def failing(call, attention=attention):
                if call.layer_idx == 1:
                    raise RuntimeError("boom")
                return attention(call)

            session.attention = failing
            with pytest.raises(RuntimeError, match="boom"):
                session.decode(runner, 7)
            session.attention = attention
            session.restore(mark)
        logits += [session.decode(runner, int(t)) for t in ids[0, 25:]]
        sessions.append((torch.stack(logits), session))
    (clean_logits, clean), (logits, restored) = sessions
    assert clean.evictions >= 1 and clean.evictions == restored.evictions
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)
    for a, b in zip(clean.state, restored.state, strict=True):
        assert torch.equal(a.ts, b.ts) and torch.equal(a.mri, b.mri)
