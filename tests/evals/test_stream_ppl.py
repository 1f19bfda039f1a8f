"""Stream perplexity: teacher forcing through a policy session matches a plain forward."""

from __future__ import annotations

import torch

from kvmux.evals.quality.stream import measure_stream, stream_nlls, window_perplexities
from tests.policies.helpers import full_logits, new_session
from tests.tiny_models import make_tiny


def _reference_nlls(model, ids: list[int]) -> torch.Tensor:
    logits = full_logits(model, torch.tensor([ids]))
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def test_full_policy_nlls_match_one_dense_forward_for_any_chunk():
    model, info, runner = make_tiny("llama")
    ids = torch.randint(0, 256, (97,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = _reference_nlls(model, ids)
    for chunk in (1, 7, 200):
        nlls = stream_nlls(new_session("full", info), runner, ids, chunk=chunk)
        assert len(nlls) == len(ids) - 1
        torch.testing.assert_close(torch.tensor(nlls), reference, atol=1e-4, rtol=1e-4)


def test_streaming_window_changes_predictions_only_after_the_window_fills():
    model, info, runner = make_tiny("llama")
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    dense = torch.tensor(stream_nlls(new_session("full", info), runner, ids, chunk=1))
    session = new_session("streaming_llm", info, sink_tokens=2, window=16, positions="original")
    windowed = torch.tensor(stream_nlls(session, runner, ids, chunk=1))
    # token t+1 is predicted from t+1 keys; all of them are kept while t+1 <= sinks + window
    torch.testing.assert_close(windowed[:18], dense[:18], atol=1e-4, rtol=1e-4)
    assert (windowed[20:] - dense[20:]).abs().max() > 1e-3


def test_measure_stream_reports_windows_and_closes_the_session():
    _, info, runner = make_tiny("llama")
    ids = list(range(1, 51))
    session = new_session("streaming_llm", info, sink_tokens=2, window=8)
    result = measure_stream(session, runner, ids, chunk=4, window=16)
    assert [w["end"] for w in result["windows"]] == [16, 32, 48, 49]
    assert result["kv"]["tokens_seen"] == 50 and result["kv"]["tokens_kept"] <= 2 + 8
    assert session.cache.get_seq_length() == 0  # closed
    assert window_perplexities([0.0] * 5, 2)[-1] == {"end": 5, "tokens": 1, "ppl": 1.0}
