"""The eval grid: resumability, per-cell rejection past the context, results layout, real engine path."""

from __future__ import annotations

import json

import pytest

from kvmux.evals.quality.backends import EngineBackend, Generation, Rejected
from kvmux.evals.quality.results import cell_key
from kvmux.evals.quality.runner import EvalConfig, EvalRunner, Variant, make_variants
from kvmux.evals.quality.stream import generate_after_stream
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer


class FakeBackend:
    """Answers correctly for 'good' presets; 'short' presets accept at most 1000 tokens."""

    kind = "fake"
    model_name = "fake-model"

    def __init__(self, tokenizer, refuse: set[str] | None = None):
        self.tokenizer = tokenizer
        self.calls: list[tuple[str, str]] = []
        self.refuse = refuse or set()

    def policy_name(self, kv_policy):
        return "dense" if kv_policy["preset"].startswith("good") else "lossy"

    def context_limit(self, kv_policy):
        return 1000 if kv_policy["preset"].endswith("short") else None

    def generate(self, sample, kv_policy):
        if kv_policy["preset"] in self.refuse:
            raise Rejected(f"preset {kv_policy['preset']} refused by the server")
        self.calls.append((kv_policy["preset"], sample.prompt_sha256))
        assert kv_policy["query"] == sample.query
        text = " " + " ".join(sample.answers) if kv_policy["preset"].startswith("good") else " 0"
        kv = {"kv_ratio": 1.0 if kv_policy["preset"].startswith("good") else 0.25, "tokens_kept": 10}
        return Generation(text, sample.prompt_tokens, 3, "stop", 0.01, kv)

    def close(self):
        pass


def _config(tmp_path, presets, **kw):
    base = dict(tasks=["passkey"], lengths=[512, 2048], depths=[0.0, 100.0], samples=2, seed=3, out=tmp_path)
    return EvalConfig(variants=[Variant(p) for p in presets], **{**base, **kw})


def test_grid_scores_every_cell_and_rejects_prompts_past_the_context(tmp_path, smol_tokenizer):
    backend = FakeBackend(smol_tokenizer)
    data = EvalRunner(_config(tmp_path, ["good_short", "bad"]), backend, progress=False).run()
    cells = data["cells"]
    assert len(cells) == 2 * 2 * 2
    good = cells[cell_key("good_short", "passkey", 512, 0.0)]
    assert good["status"] == "done" and good["summary"]["score"] == 100.0 and good["summary"]["n"] == 2
    assert good["policy"] == "dense" and good["samples"][0]["prompt_sha256"]
    assert cells[cell_key("bad", "passkey", 2048, 100.0)]["summary"]["score"] == 0.0
    rejected = cells[cell_key("good_short", "passkey", 2048, 100.0)]
    assert rejected["status"] == "rejected" and "at most 1000" in rejected["message"]
    # both variants read the same prompts; the rejected cells never reached the backend
    assert len(backend.calls) == 2 * 2 * 2 + 2 * 2
    by_preset = {p: {h for q, h in backend.calls if q == p} for p in ("good_short", "bad")}
    assert by_preset["good_short"] < by_preset["bad"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"].keys() == cells.keys() and saved["meta"]["format"] == "raw"


def test_rerun_skips_finished_cells_and_completes_partial_ones(tmp_path, smol_tokenizer):
    EvalRunner(_config(tmp_path, ["good", "bad"]), FakeBackend(smol_tokenizer), progress=False).run()
    again = FakeBackend(smol_tokenizer)
    EvalRunner(_config(tmp_path, ["good", "bad"]), again, progress=False).run()
    assert again.calls == []
    path = tmp_path / "results.json"
    data = json.loads(path.read_text())
    cell = data["cells"][cell_key("bad", "passkey", 2048, 0.0)]
    cell["samples"] = cell["samples"][:1]
    cell["status"] = "partial"
    path.write_text(json.dumps(data))
    third = FakeBackend(smol_tokenizer)
    out = EvalRunner(_config(tmp_path, ["good", "bad", "good2"]), third, progress=False).run()
    assert sorted(p for p, _ in third.calls) == ["bad"] + ["good2"] * 8
    assert out["cells"][cell_key("bad", "passkey", 2048, 0.0)]["status"] == "done"
    assert [s["index"] for s in out["cells"][cell_key("bad", "passkey", 2048, 0.0)]["samples"]] == [0, 1]


def test_server_refusal_marks_the_cell_and_the_grid_goes_on(tmp_path, smol_tokenizer):
    backend = FakeBackend(smol_tokenizer, refuse={"bad"})
    data = EvalRunner(_config(tmp_path, ["bad", "good"], lengths=[512]), backend, progress=False).run()
    bad = data["cells"][cell_key("bad", "passkey", 512, 0.0)]
    assert bad["status"] == "rejected" and "refused by the server" in bad["message"]
    assert data["cells"][cell_key("good", "passkey", 512, 100.0)]["summary"]["score"] == 100.0


def test_results_of_other_settings_are_not_mixed(tmp_path, smol_tokenizer):
    EvalRunner(_config(tmp_path, ["good"], lengths=[512], samples=1), FakeBackend(smol_tokenizer), False).run()
    with pytest.raises(ValueError, match="format"):
        EvalRunner(_config(tmp_path, ["good"], chat=True), FakeBackend(smol_tokenizer), progress=False)


def test_depthless_tasks_run_one_cell_per_length(tmp_path, smol_tokenizer):
    backend = FakeBackend(smol_tokenizer)
    data = EvalRunner(_config(tmp_path, ["good"], tasks=["cwe"], samples=1), backend, progress=False).run()
    assert set(data["cells"]) == {cell_key("good", "cwe", 512, None), cell_key("good", "cwe", 2048, None)}


def test_variants_expand_overrides_into_labelled_settings():
    variants = make_variants(["full", "streaming_llm"], {"streaming_llm": [{"window": 64}, {"window": 256}]})
    assert [v.label for v in variants] == ["full", "streaming_llm[window=64]", "streaming_llm[window=256]"]
    assert variants[1].kv_policy("q?") == {"preset": "streaming_llm", "window": 64, "query": "q?"}
    assert Variant("default").kv_policy("q?") is None
    with pytest.raises(ValueError):
        make_variants(["full"], {"other": {"window": 1}})


@pytest.fixture(scope="module")
def tiny_engine(smol_tokenizer):
    from kvmux.models.loader import LoadedModel
    from kvmux.policies.presets import Preset
    from kvmux.policies.registry import get_policy
    from kvmux.server.engine import Engine
    from tests.tiny_models import make_tiny

    model, info, _ = make_tiny("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=512)
    full, streaming = get_policy("full"), get_policy("streaming_llm")
    presets = {
        "full": Preset("full", full, full.Params()),
        "streaming_llm": Preset("streaming_llm", streaming, streaming.Params(sink_tokens=4, window=60)),
    }
    return Engine(LoadedModel(model, smol_tokenizer, info), presets, prefill_chunk_tokens=128)


def test_in_process_engine_runs_generation_and_stream_cells(tmp_path, tiny_engine):
    backend = EngineBackend(tiny_engine)
    config = _config(
        tmp_path,
        ["full", "streaming_llm"],
        tasks=["passkey", "stream_ppl"],
        lengths=[256, 700],
        depths=[50.0],
        samples=1,
        ppl_chunk=16,
        ppl_window=100,
    )
    cells = EvalRunner(config, backend, progress=False).run()["cells"]
    full = cells[cell_key("full", "passkey", 256, 50.0)]
    assert full["status"] == "done" and full["samples"][0]["kv"]["policy"] == "full"
    assert full["samples"][0]["prompt_tokens"] == full["summary"]["prompt_tokens"] <= 246
    stream = cells[cell_key("streaming_llm", "passkey", 700, 50.0)]
    assert stream["status"] == "done"
    assert stream["samples"][0]["kv"]["tokens_kept"] <= 64 < stream["samples"][0]["kv"]["tokens_seen"]
    # the 512-token context rejects `full` at 700, StreamingLLM (cache positions) streams through
    assert cells[cell_key("full", "passkey", 700, 50.0)]["status"] == "rejected"
    assert "512" in cells[cell_key("full", "stream_ppl", 700, None)]["message"]
    ppl = cells[cell_key("streaming_llm", "stream_ppl", 700, None)]
    assert ppl["status"] == "done" and ppl["summary"]["ppl"] > 1.0
    assert [w["end"] for w in ppl["samples"][0]["windows"]] == [100, 200, 300, 400, 500, 600, 699]


def test_more_samples_extend_finished_cells_without_recomputing_them(tmp_path, smol_tokenizer):
    EvalRunner(_config(tmp_path, ["good"], samples=1), FakeBackend(smol_tokenizer), progress=False).run()
    first = json.loads((tmp_path / "results.json").read_text())["cells"][cell_key("good", "passkey", 512, 0.0)]
    more = FakeBackend(smol_tokenizer)
    out = EvalRunner(_config(tmp_path, ["good"], samples=3), more, progress=False).run()
    assert len(more.calls) == 4 * 2  # 4 cells x the 2 new sample indices, nothing recomputed
    cell = out["cells"][cell_key("good", "passkey", 512, 0.0)]
    assert cell["status"] == "done" and [s["index"] for s in cell["samples"]] == [0, 1, 2]
    assert cell["samples"][0] == first["samples"][0] and cell["summary"]["n"] == 3
    fewer = FakeBackend(smol_tokenizer)
    EvalRunner(_config(tmp_path, ["good"], samples=2), fewer, progress=False).run()
    assert fewer.calls == []  # asking for fewer samples than are there changes nothing


def test_decode_recall_feeds_the_prose_as_decoding_in_process(tmp_path, tiny_engine, smol_tokenizer):
    backend = EngineBackend(tiny_engine)
    sample = get_task("decode_recall").make(Renderer(smol_tokenizer), 400, 50.0, 0, seed=1)
    assert 0 < sample.decode_from < sample.prompt_tokens
    fed = generate_after_stream(backend, sample, {"preset": "full"}, chunk=16)
    prefilled = backend.generate(sample, {"preset": "full"})  # the whole prompt prefilled at once
    assert fed.text == prefilled.text and fed.completion_tokens == prefilled.completion_tokens
    assert fed.kv["tokens_seen"] == sample.prompt_tokens + fed.completion_tokens - 1
    windowed = generate_after_stream(backend, sample, {"preset": "streaming_llm"}, chunk=16)
    assert windowed.kv["tokens_kept"] <= 4 + 60 + 16  # evicted while the prose was fed, chunk by chunk
    config = _config(tmp_path, ["full", "streaming_llm"], tasks=["decode_recall"], lengths=[400], depths=[50.0])
    cells = EvalRunner(config, backend, progress=False).run()["cells"]
    cell = cells[cell_key("full", "decode_recall", 400, 50.0)]
    assert cell["status"] == "done" and len(cell["samples"]) == 2
    http = FakeBackend(smol_tokenizer)
    http.open_session = lambda kv_policy: (_ for _ in ()).throw(Rejected("needs the in-process backend"))
    cells = EvalRunner(_config(tmp_path / "http", ["good"], tasks=["decode_recall"]), http, progress=False).run()
    assert all(c["status"] == "rejected" and "in-process" in c["message"] for c in cells["cells"].values())
