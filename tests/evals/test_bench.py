"""`kvmux bench`: shapes, the in-process benchmark and its reports, and the serving-load statistics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from kvmux.cli_args import parse_tokens
from kvmux.evals.bench.cli import main as bench_main
from kvmux.evals.bench.cli import select_presets
from kvmux.evals.bench.gpu_check import GROWTH, Clock, agreement_stage, compare
from kvmux.evals.bench.measure import BASELINE_NAME, attention_sparsity, end_of_sequence_ids, greedy_token
from kvmux.evals.bench.prompts import prompt_ids
from kvmux.evals.bench.report import write_report
from kvmux.evals.bench.run import BenchSettings, run_bench, summarize
from kvmux.evals.bench.serve_load import (
    LoadSettings,
    RequestRecord,
    inter_token_latencies,
    percentile,
    run_load,
    summarize_level,
)
from kvmux.evals.bench.shapes import build_random_model, get_shape, meta_model, parameter_count
from kvmux.policies.presets import load_presets, resolve_request_policy

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "policies"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- shapes ------------------------------------------------------------------------------------
def test_llama3_8b_shape_builds_the_published_model_on_meta():
    shape = get_shape("llama3-8b")
    config = shape.config()
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 8)
    assert (config.head_dim, config.hidden_size, config.intermediate_size) == (128, 4096, 14336)
    assert config.vocab_size == 128256 and config.rope_parameters["rope_theta"] == 500000.0
    assert config.max_position_embeddings == 131072
    model = meta_model(shape)
    assert next(model.parameters()).device.type == "meta"
    assert parameter_count(model) == 8_030_261_248  # Llama-3-8B's parameter count
    with pytest.raises(KeyError, match="known shapes"):
        get_shape("llama-99b")


def test_random_model_is_seeded_finite_and_has_true_rope_tables():
    a = build_random_model("tiny", "cpu", torch.float32, seed=3)
    b = build_random_model("tiny", "cpu", torch.float32, seed=3)
    c = build_random_model("tiny", "cpu", torch.float32, seed=4)
    pa, pb, pc = (list(m.model.parameters()) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc, strict=True))
    shape = get_shape("tiny")
    expected = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
    torch.testing.assert_close(a.info.inv_freq, expected)
    assert a.model.config._attn_implementation == "kvmux"
    assert a.info.num_kv_heads == 2 and a.info.dtype == torch.float32
    with torch.inference_mode():
        logits = a.model(torch.arange(10)[None]).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


# -- in-process bench --------------------------------------------------------------------------
def test_attention_sparsity_reads_sparsity_or_density():
    assert attention_sparsity({"hip_density": 0.25, "hip_rounds": 3}) == 0.75
    assert attention_sparsity({"attention_sparsity": 0.4, "density": 0.9}) == 0.4
    assert attention_sparsity({"positions": "cache", "flag_density": True}) is None
    assert attention_sparsity({}) is None


def test_summary_median_and_spread():
    s = summarize([3.0, 1.0, None, 2.0])
    assert (s["n"], s["median"], s["min"], s["max"], s["mean"]) == (3, 2.0, 1.0, 3.0, 2.0)
    assert s["stdev"] == pytest.approx(1.0)
    assert summarize([None])["median"] is None


@pytest.fixture(scope="module")
def tiny_bench():
    """A CPU bench of a tiny random model whose context (128) the second length exceeds."""
    loaded = build_random_model("tiny", "cpu", torch.float32, seed=0, max_context=128)
    presets = load_presets(PRESETS_DIR)
    window, _ = resolve_request_policy({"preset": "streaming_llm", "window": 28}, presets, "full")
    chosen = {"full": presets["full"], "streaming_llm": window}
    settings = BenchSettings(lengths=(96, 160), new_tokens=4, repeats=2, warmup=1, prefill_chunk_tokens=32)
    return run_bench(loaded.model, loaded.info, chosen, settings, source="test")


def _row(doc, preset, length):
    (row,) = [r for r in doc["results"] if r["preset"] == preset and r["length"] == length]
    return row


def test_bench_measures_every_preset_against_generate(tiny_bench):
    doc = tiny_bench
    assert doc["kind"] == "kvmux-bench" and doc["settings"]["memory_measure"] == "rss_peak"
    assert {(r["preset"], r["length"]) for r in doc["results"]} == {
        (name, length) for name in (BASELINE_NAME, "full", "streaming_llm") for length in (96, 160)
    }
    base, full, stream = (_row(doc, name, 96) for name in (BASELINE_NAME, "full", "streaming_llm"))
    for row in (base, full, stream):
        assert row["status"] == "ok" and len(row["samples"]) == 2  # warm-up round excluded
        assert row["summary"]["ttft_s"]["n"] == 2 and row["summary"]["ttft_s"]["median"] > 0
        assert row["summary"]["decode_tokens_per_s"]["median"] > 0
        assert all(len(s["tokens"]) == 4 and s["decode_tokens"] == 3 for s in row["samples"])
        assert row["summary"]["peak_mem_bytes"]["median"] > 0
    for key in ("ttft_s", "decode_tokens_per_s", "peak_mem_bytes", "kv_bytes_kept_peak"):
        assert base["ratios"][key] == 1.0
    for key in ("ttft_s", "decode_tokens_per_s", "kv_bytes_kept_peak"):
        expected = full["summary"][key]["median"] / base["summary"][key]["median"]
        assert full["ratios"][key] == pytest.approx(expected)
    # the full cache holds every token the model has seen, as generate's does: prompt + 3 fed back
    kv_per_token = doc["model"]["kv_bytes_per_token"]
    assert full["summary"]["kv_bytes_kept_peak"]["median"] == base["summary"]["kv_bytes_kept_peak"]["median"]
    assert full["summary"]["kv_bytes_kept_peak"]["median"] == (96 + 3) * kv_per_token
    assert full["summary"]["kv_bytes_kept_end"]["median"] == (96 + 3) * kv_per_token  # nothing evicted
    assert full["tokens_match_baseline"] == 1.0  # fp32, same computation, same greedy tokens
    # StreamingLLM keeps 4 sinks + 28 recent tokens (+ one chunk in flight at most)
    assert stream["summary"]["tokens_kept_peak"]["median"] <= 4 + 28 + 32
    # after the last token the ring holds exactly its sinks + window
    assert stream["summary"]["kv_bytes_kept_end"]["median"] == (4 + 28) * kv_per_token
    assert stream["summary"]["kv_ratio"]["median"] < 0.7
    assert stream["ratios"]["kv_bytes_kept_peak"] < 0.7


def test_bench_skips_cells_past_a_policy_context_limit(tiny_bench):
    full, stream, base = (_row(tiny_bench, name, 160) for name in ("full", "streaming_llm", BASELINE_NAME))
    assert full["status"] == "skipped" and "context limit 128" in full["note"] and not full["samples"]
    assert stream["status"] == "ok"  # cache positions: streams past the model's context
    assert base["status"] == "ok" and "beyond the model's context" in base["note"]


def test_bench_reports_are_written(tiny_bench, tmp_path):
    paths = write_report(tiny_bench, tmp_path)
    assert json.loads(paths["json"].read_text())["results"][0]["preset"] == BASELINE_NAME
    markdown = paths["md"].read_text()
    assert "| 96 | full | full |" in markdown and "| 160 | full | full |" in markdown
    assert "context limit" in markdown and "TTFT ×" in markdown
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_gate_skips_runs_and_callbacks_hear_runs_and_lengths():
    loaded = build_random_model("tiny", "cpu", torch.float32)
    presets = {"full": load_presets(PRESETS_DIR)["full"]}
    heard, checkpoints = [], []
    doc = run_bench(
        loaded.model,
        loaded.info,
        presets,
        BenchSettings(lengths=(48, 40), new_tokens=2, repeats=1, warmup=0),
        gate=lambda target, length: "over budget" if (target, length) == ("full", 48) else None,
        on_run=lambda target, length, seconds: heard.append((target, length)),
        checkpoint=checkpoints.append,
    )
    assert _row(doc, "full", 48)["status"] == "skipped" and _row(doc, "full", 48)["note"] == "over budget"
    assert _row(doc, "full", 40)["status"] == "ok"
    assert heard == [(BASELINE_NAME, 48), (BASELINE_NAME, 40), ("full", 40)]
    assert [[(r["preset"], r["length"]) for r in c["results"]] for c in checkpoints] == [
        [(BASELINE_NAME, 48), ("full", 48)],
        [(BASELINE_NAME, 48), ("full", 48), (BASELINE_NAME, 40), ("full", 40)],
    ]


@pytest.mark.model
def test_text_prompts_end_with_a_question_line_and_have_exact_length(smollm):
    ids = prompt_ids(300, smollm.info.config.vocab_size, seed=1, tokenizer=smollm.tokenizer)
    assert ids.shape == (1, 300)
    text = smollm.tokenizer.decode(ids[0])
    assert text.rstrip().endswith("most often in the text above?") and "\n" in text
    assert torch.equal(ids, prompt_ids(300, smollm.info.config.vocab_size, seed=1, tokenizer=smollm.tokenizer))


# -- command line ------------------------------------------------------------------------------
def test_parse_tokens_and_overrides():
    assert [parse_tokens(t) for t in ("2048", "2K", "128k", "1M")] == [2048, 2048, 131072, 1048576]
    chosen = select_presets(PRESETS_DIR, ["full", "streaming_llm"], '{"window": 64}')
    assert chosen["streaming_llm"].params.window == 64 and chosen["full"].params.model_dump() == {}
    per_preset = select_presets(PRESETS_DIR, ["streaming_llm"], '{"streaming_llm": {"sink_tokens": 2}}')
    assert per_preset["streaming_llm"].params.sink_tokens == 2
    with pytest.raises(SystemExit, match="no selected preset has parameter"):
        select_presets(PRESETS_DIR, ["full"], '{"window": 64}')
    with pytest.raises(SystemExit, match="window"):
        select_presets(PRESETS_DIR, ["streaming_llm"], '{"window": 0}')
    with pytest.raises(SystemExit, match="unknown preset"):
        select_presets(PRESETS_DIR, ["nope"], None)


def test_cli_runs_a_tiny_shape_bench(tmp_path, capsys):
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--presets", "full", "--lengths", "64"]
    argv += ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["model"]["source"] == "random weights, shape tiny"
    assert [r["preset"] for r in doc["results"]] == [BASELINE_NAME, "full"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "| 64 | full | full |" in capsys.readouterr().out


# -- serving load ------------------------------------------------------------------------------
def test_percentiles_and_inter_token_latencies():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(float(np.percentile(values, 99)))
    assert percentile([], 50) is None
    assert inter_token_latencies([1.0, 1.1, 1.3, 1.6]) == pytest.approx([0.1, 0.2, 0.3])
    assert inter_token_latencies([2.0]) == []


def test_level_summary_follows_vllm_definitions():
    ok1 = RequestRecord(start=0.0, end=1.0, chunk_times=[0.2, 0.4, 0.6, 1.0], output_tokens=4, prompt_tokens=10)
    ok2 = RequestRecord(start=0.5, end=2.5, chunk_times=[1.5, 2.5], output_tokens=2, prompt_tokens=10)
    failed = RequestRecord(start=0.0, end=0.1, error="HTTP 400: bad preset")
    silent = RequestRecord(start=0.0, end=0.1)  # HTTP 200 but no text: failed too
    s = summarize_level([ok1, ok2, failed, silent], duration_s=2.0)
    assert (s["completed"], s["failed"], s["num_requests"]) == (2, 2, 4)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 13.0
    assert {e["message"] for e in s["errors"]} == {"HTTP 400: bad preset", "no text streamed"}
    assert s["ttft_ms"]["median"] == pytest.approx(600.0)  # TTFTs 200 ms and 1000 ms
    assert s["ttft_ms"]["p99"] == pytest.approx(200 + 0.99 * 800)
    # TPOT: (1.0 - 0.2) / 3 and (2.0 - 1.0) / 1; ITL: gaps 0.2, 0.2, 0.4 and 1.0
    assert s["tpot_ms"]["mean"] == pytest.approx((800 / 3 + 1000) / 2)
    assert s["itl_ms"]["median"] == pytest.approx(300.0) and s["itl_ms"]["max"] == pytest.approx(1000.0)
    assert s["e2el_ms"]["mean"] == pytest.approx(1500.0)


class FakeServer:
    """An OpenAI-compatible completions endpoint: one token per word of prompt, one chunk per token."""

    def __init__(self):
        self.bodies: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if body.get("kv_policy") == "broken":
            return httpx.Response(400, json={"error": {"message": "Unknown kv_policy preset 'broken'"}})
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": body["max_tokens"]}
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": usage})
        events = [{"choices": [{"index": 0, "text": f" t{i}"}]} for i in range(body["max_tokens"])]
        events.append({"choices": [], "usage": usage})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=payload.encode(), headers={"content-type": "text/event-stream"})


def test_load_mode_against_a_fake_server(tmp_path):
    server = FakeServer()
    settings = LoadSettings(prompt_tokens=50, max_tokens=5, concurrency=(1, 2), num_requests=3)
    policies = {"streaming_llm": {"preset": "streaming_llm", "window": 64}, "broken": "broken"}
    doc = asyncio.run(run_load("http://bench.test/v1", settings, policies, transport=httpx.MockTransport(server)))
    assert doc["model"] == "fake-model" and doc["url"] == "http://bench.test"
    good = [r for r in doc["results"] if r["preset"] == "streaming_llm"]
    assert [r["concurrency"] for r in good] == [1, 2]
    for row in good:
        assert (row["completed"], row["failed"], row["total_output_tokens"]) == (3, 0, 15)
        assert row["mean_prompt_tokens"] == 50  # calibrated against the server's own count
        assert row["ttft_ms"]["median"] is not None and row["itl_ms"]["median"] is not None
    streamed = [b for b in server.bodies if b.get("stream") and b["kv_policy"] != "broken"]
    assert len(streamed) == 6 and len({b["prompt"] for b in streamed}) == 6  # distinct prompts
    assert all(b["ignore_eos"] and b["stream_options"] == {"include_usage": True} for b in streamed)
    assert all(b["temperature"] == 0.0 and b["kv_policy"]["window"] == 64 for b in streamed)
    broken = [r for r in doc["results"] if r["preset"] == "broken"]
    assert [(r["completed"], r["failed"]) for r in broken] == [(0, 3), (0, 3)]
    assert broken[0]["errors"] == [{"message": "HTTP 400: Unknown kv_policy preset 'broken'", "count": 3}]
    paths = write_report(doc, tmp_path)
    assert "| streaming_llm | 50 | 2 | 3 / 0 |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


# -- GPU check logic (run here on CPU with a tiny shape) ---------------------------------------
def test_clock_estimates_grow_with_length_and_gate_on_budget():
    clock = Clock(budget_s=100.0, reserve_s=0.0)
    assert clock.estimate("full", 2048) is None and clock.gate("full", 2048) is None
    clock.record("generate", 1024, 2.0)
    assert clock.estimate("full", 1024, fallback="generate") == pytest.approx(4.0)  # unknown target: 2× baseline
    clock.record("full", 1024, 3.0)
    assert clock.estimate("full", 2048) == pytest.approx(3.0 * 2**GROWTH)
    clock.record("slow", 1024, 90.0)
    assert "left in the budget" in clock.gate("slow", 2048)
    clock.deadline = clock.start
    assert clock.gate("full", 1024) == "time budget spent"


def test_compare_scores_agreement_of_logits():
    ref = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    same = compare(ref, ref.clone())
    assert same["finite"] and same["top1_agreement"] == 1.0 and same["first_token_match"]
    assert same["cosine_min"] == pytest.approx(1.0) and same["kl_max"] == pytest.approx(0.0, abs=1e-6)
    other = compare(ref, -ref)
    assert other["top1_agreement"] == 0.0 and other["cosine_min"] == pytest.approx(-1.0) and other["kl_mean"] > 1
    assert not compare(ref, torch.full_like(ref, float("nan")))["finite"]


def test_agreement_stage_passes_full_and_runs_other_policies():
    loaded = build_random_model("tiny", "cpu", torch.float32, seed=1)
    presets = load_presets(PRESETS_DIR)
    small, _ = resolve_request_policy({"preset": "streaming_llm", "window": 16}, presets, "full")
    rows = agreement_stage(loaded, {"full": presets["full"], "small": small}, Clock(600), 96, 3, 32)
    full, stream = rows
    assert full["status"] == "pass" and full["top1_agreement"] == 1.0 and full["cosine_min"] > 0.9999
    assert stream["status"] == "ran" and stream["policy"] == "streaming_llm" and stream["finite"]
    assert stream["kl_mean"] > full["kl_mean"]


def test_baseline_is_left_out_above_its_limit_and_rates_are_reported(tmp_path):
    loaded = build_random_model("tiny", "cpu", torch.float32)
    presets = {"full": load_presets(PRESETS_DIR)["full"]}
    settings = BenchSettings(lengths=(40, 48), new_tokens=2, repeats=1, warmup=0, baseline_max_tokens=44)
    doc = run_bench(loaded.model, loaded.info, presets, settings)
    assert _row(doc, BASELINE_NAME, 40)["status"] == "ok"
    above = _row(doc, BASELINE_NAME, 48)
    assert above["status"] == "skipped" and "above 44" in above["note"] and not above["samples"]
    full = _row(doc, "full", 48)
    assert full["status"] == "ok" and "ratios" not in full  # nothing to divide by
    assert doc["settings"]["baseline_max_tokens"] == 44
    markdown = write_report(doc, tmp_path)["md"].read_text()
    rate = 48 / full["summary"]["ttft_s"]["median"]
    assert f"| 48 | full | full | {full['summary']['ttft_s']['median'] * 1e3:.1f} | – | {rate:.0f} |" in markdown


def test_sessions_never_pick_the_tokens_generate_bans():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert greedy_token(logits, []) == 1
    assert greedy_token(logits, [1]) == 3 and logits[0, 1] == 5.0  # the caller's logits are untouched
    model = build_random_model("tiny", "cpu", torch.float32).model
    model.generation_config.eos_token_id = [2, 7]
    assert end_of_sequence_ids(model) == [2, 7]
    model.generation_config.eos_token_id = 5
    assert end_of_sequence_ids(model) == [5]
