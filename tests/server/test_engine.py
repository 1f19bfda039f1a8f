"""The engine's generation loop on tiny and embedded models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmux.errors import RequestError
from kvmux.policies.presets import load_presets
from kvmux.server.detok import IncrementalDetokenizer, StopStrings
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "policies"


@pytest.fixture(scope="module")
def engine(smollm):
    return Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=64)


@pytest.mark.model
def test_greedy_equals_model_generate(engine, smollm):
    prompt = "The three primary colours are red, yellow and"
    result = engine.generate(prompt=prompt, sampling=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ids = torch.tensor([engine.tokenize(prompt, add_special_tokens=True)])
    model = smollm.model
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1] :]
    assert result.token_ids == expected.tolist()
    assert result.text == smollm.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.finish_reason == "length" and result.completion_tokens == 12


@pytest.mark.model
def test_chat_and_stop_strings(engine):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    free = engine.generate(messages=messages, sampling=SamplingParams(max_tokens=40, temperature=0.0))
    assert "5" in free.text
    stopped = engine.generate(messages=messages, sampling=SamplingParams(max_tokens=40, temperature=0.0, stop=["5"]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("5")]


@pytest.mark.model
def test_seeded_sampling_is_reproducible(engine):
    sampling = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = engine.generate(prompt="Once upon a time", sampling=sampling)
    b = engine.generate(prompt="Once upon a time", sampling=sampling)
    assert a.token_ids == b.token_ids


@pytest.mark.model
def test_kv_stats_reflect_policy(engine):
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    prompt = "word " * 300
    full = engine.generate(prompt=prompt, sampling=sampling, kv_policy="full")
    sink = engine.generate(
        prompt=prompt, sampling=sampling, kv_policy={"preset": "streaming_llm", "sink_tokens": 4, "window": 60}
    )
    assert full.kv["policy"] == "full" and full.kv["tokens_kept"] == full.kv["tokens_seen"]
    assert sink.kv["policy"] == "streaming_llm" and sink.kv["tokens_kept"] == 64
    assert sink.kv["kv_bytes_kept"] < full.kv["kv_bytes_kept"]
    assert sink.kv["prefill_ms"] > 0


@pytest.mark.model
def test_bad_requests_raise_clear_errors(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.prepare(prompt="")
    with pytest.raises(RequestError, match="max_tokens"):
        engine.prepare(prompt="hi", sampling=SamplingParams(max_tokens=0))
    with pytest.raises(RequestError, match="maximum context length"):
        engine.prepare(prompt="hi " * 9000)


class _ByteTokenizer:
    """Token = one UTF-8 byte; decode replaces incomplete sequences with U+FFFD like real tokenizers."""

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_multibyte_characters():
    detok = IncrementalDetokenizer(_ByteTokenizer(), prompt_ids=list(b"ab"))
    pieces = [detok.add(b) for b in "héllo €".encode()]
    assert "".join(pieces) == "héllo €"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_hold_back_only_possible_prefixes():
    stops = StopStrings(["END", "\n\n"])
    assert stops.safe_length("abc E") == 4
    assert stops.safe_length("abc x") == 5
    assert stops.find("abc EN", 0) is None
    assert stops.find("abc END", 4) == 4
