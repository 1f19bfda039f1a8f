"""`kvmux bench` peers, roofline and decode profile: behaviour on tiny models, not timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvmux.evals.bench import peers
from kvmux.evals.bench.cli import main as bench_main
from kvmux.evals.bench.measure import BASELINE_NAME, end_of_sequence_ids, run_generate
from kvmux.evals.bench.probes import MemoryProbe
from kvmux.evals.bench.profile import CATEGORIES, breakdown, categorize, profile_generate, profile_session
from kvmux.evals.bench.roofline import add_roofline, decode_weight_bytes, measure_bandwidth, roofline_figures
from kvmux.evals.bench.run import BenchSettings, run_bench
from kvmux.evals.bench.shapes import build_random_model
from kvmux.policies.base import SessionRequest
from kvmux.policies.presets import load_presets
from tests.tiny_models import make_tiny

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "policies"


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _ids(length: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))


# -- static-cache peers ---------------------------------------------------------------------------
def test_static_peer_generates_the_same_greedy_tokens_as_generate(llama):
    model, info, _ = llama
    probe = MemoryProbe(info.device)
    base = run_generate(model, info, _ids(), 6, probe)
    static = peers.run_static(model, info, _ids(), 6, probe, compiled=False)
    assert static.tokens == base.tokens and len(static.tokens) == 6
    assert static.kv_bytes_kept_peak >= base.kv_bytes_kept_peak  # the whole allocation
    assert model.config._attn_implementation == "kvmux"  # switched back after the run


def test_compiled_peer_compiles_once_and_restores_the_forward(llama, monkeypatch):
    model, info, _ = llama
    calls = []

    def fake_compile(fn, **options):  # stands in for torch.compile: same calls, no compiler
        calls.append(options)
        return fn

    monkeypatch.setattr(peers.torch, "compile", fake_compile)
    model.__dict__.pop(peers._COMPILED_ATTR, None)
    probe = MemoryProbe(info.device)
    first = peers.run_static(model, info, _ids(), 4, probe, compiled=True)
    second = peers.peer_runner(peers.STATIC_COMPILED)(model, info, _ids(), 4, probe)
    assert calls == [{"mode": "default", "dynamic": False}]  # compiled once, reused by the next run
    assert first.tokens == second.tokens == run_generate(model, info, _ids(), 4, probe).tokens
    assert "forward" not in model.__dict__  # the class's forward is back
    model.__dict__.pop(peers._COMPILED_ATTR)


class _FakeCompilerError(RuntimeError):
    pass


_FakeCompilerError.__module__ = "torch._inductor.exc"


def test_a_compile_failure_is_the_rows_note_not_a_crash(monkeypatch):
    loaded = build_random_model("tiny", "cpu", torch.float32, seed=0, max_context=128)

    def broken(*args, **kwargs):
        raise _FakeCompilerError("C++ compiler not found")

    monkeypatch.setattr(peers.torch, "compile", lambda fn, **options: broken)
    presets = {"full": load_presets(PRESETS_DIR)["full"]}
    settings = BenchSettings(
        lengths=(48,), new_tokens=3, repeats=1, warmup=1, peers=peers.STATIC_PEERS, bandwidth_mib=4
    )
    doc = run_bench(loaded.model, loaded.info, presets, settings)
    rows = {row["preset"]: row for row in doc["results"]}
    assert list(rows) == [BASELINE_NAME, *peers.STATIC_PEERS, "full"]
    assert rows[peers.STATIC_COMPILED]["status"] == "error"
    assert rows[peers.STATIC_COMPILED]["note"].startswith("torch.compile failed: _FakeCompilerError: C++ compiler")
    static = rows[peers.STATIC]
    assert static["status"] == "ok" and static["tokens_match_baseline"] == 1.0
    assert static["params"]["cache_implementation"] == "static" and "ratios" in static
    assert rows["full"]["roofline"]["tokens_per_s"] > 0 and rows[peers.STATIC_COMPILED]["roofline"] is None
    assert doc["roofline"]["bytes_per_s"] > 0 and doc["settings"]["peers"] == list(peers.STATIC_PEERS)
    with pytest.raises(ValueError, match="unknown peer"):
        BenchSettings(lengths=(8,), peers=("vllm",))


# -- roofline ---------------------------------------------------------------------------------------
def test_roofline_arithmetic():
    figures = roofline_figures(decode_tokens_per_s=10.0, kv_bytes=1e6, weight_bytes=9_000_000, bandwidth=1e9)
    assert figures == pytest.approx({"bytes_per_token": 1e7, "tokens_per_s": 100.0, "fraction": 0.1})
    assert roofline_figures(None, None, 100, 1e3) == {"bytes_per_token": 100.0, "tokens_per_s": 10.0, "fraction": None}
    row = {"status": "ok", "summary": {"decode_tokens_per_s": {"median": 5.0}, "kv_bytes_kept_peak": {"median": 0.0}}}
    assert add_roofline(row, 1000, 1e4)["roofline"]["fraction"] == pytest.approx(0.5)
    assert add_roofline({"status": "skipped", "summary": {}}, 1000, 1e4)["roofline"] is None


def test_weights_read_per_token_leave_out_an_untied_input_embedding(llama):
    model, _, _ = llama
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    expected = total if tied else total - embed.numel() * embed.element_size()
    assert decode_weight_bytes(model) == expected


def test_bandwidth_is_measured_as_copy_and_read():
    bw = measure_bandwidth(torch.device("cpu"), mib=4, tries=2)
    assert bw["bytes_per_s"] == max(bw["copy_bytes_per_s"], bw["read_bytes_per_s"]) > 0
    assert bw["tensor_mib"] == 4 and bw["tries"] == 2


# -- decode profile ---------------------------------------------------------------------------------
def test_operators_fall_into_the_profile_categories():
    assert categorize("aten::addmm") == categorize("aten::linear") == "matmul"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert {categorize(f"aten::{op}") for op in ("index_select", "copy_", "cat")} == {"cache_copy_index"}
    assert categorize("aten::rsqrt") == "other_kernels"
    table = breakdown([("aten::mm", 0.2), ("aten::softmax", 0.1), ("aten::cat", 0.05), ("aten::silu", 0.05)], 0.5, 5)
    assert table["ms_per_token"] == pytest.approx(
        {"matmul": 40.0, "attention": 20.0, "cache_copy_index": 10.0, "other_kernels": 10.0, "outside_kernels": 20.0}
    )
    assert sum(table["ms_per_token"].values()) == pytest.approx(table["wall_ms_per_token"]) == 100.0


def test_profiles_of_a_session_and_of_generate_sum_to_their_wall_time(llama):
    model, info, runner = llama
    full = load_presets(PRESETS_DIR)["full"]
    request = SessionRequest(prompt_text=None, query_text=None)
    rows = [
        profile_session(runner, full, _ids(), 2, request, end_of_sequence_ids(model)),
        profile_generate(model, info, _ids(), 2),
    ]
    for row in rows:
        assert set(row["ms_per_token"]) == set(CATEGORIES)
        assert sum(row["ms_per_token"].values()) == pytest.approx(row["wall_ms_per_token"], rel=1e-6)
        assert row["ms_per_token"]["matmul"] > 0 and row["plain_ms_per_token"] > 0
        assert any("mm" in name for name in row["top_ops_ms_per_token"])


# -- command line -----------------------------------------------------------------------------------
def test_cli_profile_decode_and_peer_flags(tmp_path, capsys):
    common = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--presets", "full", "--lengths", "48"]
    assert bench_main([*common, "--profile-decode", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "decode_profile.json").read_text())
    assert [r["target"] for r in doc["results"]] == [BASELINE_NAME, "full"] and doc["steps"] == 2
    assert "| 48 | full |" in (tmp_path / "decode_profile.md").read_text()
    with pytest.raises(SystemExit, match="warmup"):
        bench_main([*common, "--peers", "generate_static_compiled", "--warmup", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="generate_batch"):
        bench_main([*common, "--peers", "generate_batch", "--out", str(tmp_path)])
    argv = [*common, "--peers", "generate_static", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
    assert bench_main([*argv, "--bandwidth-mib", "4", "--out", str(tmp_path)]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [r["preset"] for r in bench["results"]] == [BASELINE_NAME, peers.STATIC, "full"]
    assert "roofline tok/s" in capsys.readouterr().out


# -- continuous batching peer -----------------------------------------------------------------------
def test_generate_batch_peer_runs_the_load_prompts_and_reports_the_ratio(llama):
    from kvmux.evals.bench.batch_peer import run_batch_peer
    from kvmux.evals.bench.report import load_markdown
    from tests.tiny_models import byte_tokenizer

    model, _, _ = llama
    level = {"preset": "full", "num_requests": 3, "prompt_words": 6, "prompt_tokens_target": 40}
    doc = {
        "settings": {"endpoint": "completions", "max_tokens": 3, "seed": 0},
        "results": [level | {"concurrency": c, "output_throughput": 5.0} for c in (1, 2)],
    }
    rows = run_batch_peer(model, byte_tokenizer(), doc, 64)
    assert [(r["concurrency"], r["num_requests"], r["errors"]) for r in rows] == [(1, 3, []), (2, 3, [])]
    for row in rows:
        assert row["total_output_tokens"] == 9 and row["output_throughput"] > 0
        assert row["ratio"] == pytest.approx(5.0 / row["output_throughput"])
    assert model.config._attn_implementation == "kvmux"
    markdown = load_markdown(doc | {"model": "tiny", "url": "u", "results": [], "peers": rows})
    assert "| generate_batch |" in markdown and "kvmux ÷ peer" in markdown
