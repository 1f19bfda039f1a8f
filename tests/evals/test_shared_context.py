"""Shared-context tasks (scb_kv, scb_multiturn): generation, the turn-by-turn runner through the in-process
engine with the prefix cache on and off, the streamed HTTP turn, the report and the CLI's cache choice."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from kvmux.evals.quality.backends import EngineBackend, HTTPBackend, Rejected
from kvmux.evals.quality.cli import add_eval_parser, engine_prefix_cache
from kvmux.evals.quality.report import write_report
from kvmux.evals.quality.runner import EvalConfig, EvalRunner, Variant
from kvmux.evals.quality.turns import turn_cell_key
from kvmux.evals.quality.turns_report import wilson_interval
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.evals.tasks.corpus import corpus_sentences
from kvmux.evals.tasks.shared_context import chat_prompt_ids

LENGTH, MAX_NEW, TURNS = 600, 4, 3


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _make(tokenizer, task: str, index: int = 0, **kw):
    args = {"max_new_tokens": MAX_NEW, "turns": TURNS, **kw}
    return get_task(task).make(Renderer(tokenizer), LENGTH, None, index, 7, **args)


def test_scb_kv_asks_another_key_each_turn_over_one_prose_context(smol_tokenizer):
    sample = _make(smol_tokenizer, "scb_kv")
    assert len(sample.turns) == TURNS and len({t.key for t in sample.turns}) == TURNS
    assert len({t.question for t in sample.turns}) == TURNS
    for ids in sample.prompt_ids:  # every turn's prompt + answer fits the length, closely
        assert LENGTH - MAX_NEW - 15 <= len(ids) <= LENGTH - MAX_NEW
    # five needles at spread depths, in order; each asked value sits in its key's needle
    needles = [sample.context[a:b] for a, b in sample.needle_spans]
    assert len(needles) == 5 and all(n.startswith("The special magic number for") for n in needles)
    starts = [a for a, _ in sample.needle_spans]
    assert starts == sorted(starts) and starts[0] < 0.3 * len(sample.context) < 0.7 * len(sample.context) < starts[-1]
    for turn in sample.turns:
        assert sum(turn.key in n and turn.answers[0] in n for n in needles) == 1
    assert sum(s in sample.context for s in corpus_sentences()) >= 8  # the novel's own sentences
    # the turns' token ids share the whole context as a prefix
    shared = _common_prefix(sample.prompt_ids[0], sample.prompt_ids[1])
    assert shared >= sample.context_tokens - 1
    again, other = _make(smol_tokenizer, "scb_kv"), _make(smol_tokenizer, "scb_kv", index=1)
    assert again.prompt_ids == sample.prompt_ids and other.context != sample.context


def test_scb_multiturn_messages_grow_with_the_earlier_answers(smol_tokenizer):
    sample = _make(smol_tokenizer, "scb_multiturn")
    kv = _make(smol_tokenizer, "scb_kv")
    assert [t.key for t in sample.turns] == [t.key for t in kv.turns]  # same keys and order for a seed
    answers = ["The number is 1.", "It is 2."]
    prompts = [sample.turn_prompt(k, answers[:k]) for k in range(TURNS)]
    assert prompts[0].prompt_ids is None
    assert prompts[0].messages == [{"role": "user", "content": sample.context + "\n" + sample.turns[0].question}]
    last = prompts[-1].messages
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert [last[1]["content"], last[3]["content"]] == answers
    assert [m["content"] for m in last[2::2]] == [t.question for t in sample.turns[1:]]
    assert [p.query for p in prompts] == [t.question for t in sample.turns]
    ids = [chat_prompt_ids(smol_tokenizer, p.messages) for p in prompts]
    for before, after in zip(ids, ids[1:], strict=False):
        assert after[: len(before)] == before  # turn k's prompt extends turn k-1's
    # the last turn, every earlier answer counted at MAX_NEW tokens, fits the length closely
    empty = chat_prompt_ids(smol_tokenizer, sample.messages(TURNS - 1, [""] * (TURNS - 1)))
    assert LENGTH - 15 <= len(empty) + TURNS * MAX_NEW <= LENGTH
    with pytest.raises(ValueError):
        sample.turn_prompt(2, answers[:1])


@pytest.fixture(scope="module")
def cached_engine(smol_tokenizer):
    from kvmux.models.loader import LoadedModel
    from kvmux.policies.presets import Preset
    from kvmux.policies.registry import get_policy
    from kvmux.server.engine import Engine
    from tests.tiny_models import make_tiny

    model, info, _ = make_tiny("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=1024)
    full = get_policy("full")
    presets = {"full": Preset("full", full, full.Params())}
    loaded = LoadedModel(model, smol_tokenizer, info)
    return Engine(loaded, presets, prefill_chunk_tokens=1024, prefix_cache_bytes="auto")


def test_turns_reuse_the_context_with_the_cache_on_and_never_off(tmp_path, cached_engine):
    backend = EngineBackend(cached_engine)
    config = EvalConfig(
        variants=[Variant("full")],
        tasks=["scb_kv", "scb_multiturn"],
        lengths=[LENGTH],
        depths=[],
        samples=2,
        seed=5,
        max_new_tokens=MAX_NEW,
        turns=TURNS,
        out=tmp_path,
    )
    data = EvalRunner(config, backend, progress=False).run()
    for task in ("scb_kv", "scb_multiturn"):
        on = data["cells"][turn_cell_key("full", task, LENGTH, "on", TURNS)]
        off = data["cells"][turn_cell_key("full", task, LENGTH, "off", TURNS)]
        assert on["status"] == off["status"] == "done" and on["cache"] == "on"
        assert [len(c["turns"]) for c in on["samples"]] == [TURNS, TURNS]
        for context in on["samples"]:
            first, *later = context["turns"]
            assert first["cached_tokens"] == 0 and first["ttft_ms"] > 0
            for before, record in zip(context["turns"], later, strict=False):
                # turns 2.. start from the cache: the whole context (scb_kv) or the whole earlier turn (chat)
                reused = context["context_tokens"] if task == "scb_kv" else before["prompt_tokens"]
                assert reused - 2 <= record["cached_tokens"] < record["prompt_tokens"]
        assert all(r["cached_tokens"] == 0 for c in off["samples"] for r in c["turns"])
        summary = on["summary"]
        assert summary["n"] == 2 * TURNS and summary["contexts"] == 2 and len(summary["accuracy_by_turn"]) == TURNS
        assert summary["cached_tokens_by_turn"][0] == 0 < min(summary["cached_tokens_by_turn"][1:])
        assert summary["ttft_ratio"] == pytest.approx(summary["ttft_ms_later"] / summary["ttft_ms_turn1"], rel=0.01)
        low, high = summary["ci95"]
        assert 0 <= low <= summary["accuracy"] <= high <= 100
    written = write_report(data, tmp_path)
    rows = json.loads((tmp_path / "shared_context.json").read_text())["cells"]
    assert tmp_path / "shared_context.json" in written and len(rows) == 4
    for row in rows:  # full reuses exactly: the same answers with the cache on and off
        assert row["identical_turns"] == row["compared_turns"] == 2 * TURNS
        fields = {"accuracy", "ci95", "accuracy_by_turn", "ttft_ms_turn1", "ttft_ratio", "cached_tokens_by_turn"}
        assert fields <= set(row)
    summary_md = (tmp_path / "summary.md").read_text()
    assert "Shared context" in summary_md and "| scb_multiturn | full | full | 600 | off | 6 (2x3) |" in summary_md
    assert "kv.prefill_ms" in summary_md and "### scb_kv" not in summary_md  # not in the single-turn tables
    # single-turn samples on the same engine leave the prefix cache alone (as before it existed)
    passkey = get_task("passkey").make(Renderer(cached_engine.tokenizer), 300, 50.0, 0, seed=1)
    assert [backend.generate(passkey, {"preset": "full"}).kv["cached_tokens"] for _ in range(2)] == [0, 0]


def _sse(events: list[dict]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def _streaming_server(seen: list[tuple[str, dict]]):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served"}]})
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        preset = (body.get("kv_policy") or {}).get("preset")
        if preset == "nope":
            return httpx.Response(400, json={"error": {"message": "Unknown kv_policy preset 'nope'"}})
        if preset == "broken":
            return httpx.Response(200, text=_sse([{"error": {"message": "the policy failed"}}]))
        chat = request.url.path.endswith("/chat/completions")
        pieces = [" 12", "34"]
        chunks = [
            {"choices": [{"index": 0, **({"delta": {"content": p}} if chat else {"text": p}), "finish_reason": f}]}
            for p, f in zip(pieces, [None, "stop"], strict=True)
        ]
        usage = {"prompt_tokens": 70, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}
        chunks.append({"choices": [], "usage": usage, "kv": {"prefill_ms": 3.0, "cached_tokens": 64}})
        return httpx.Response(200, text=_sse(chunks), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def test_http_turns_stream_and_report_cache_use_and_time_to_first_token(smol_tokenizer):
    seen: list[tuple[str, dict]] = []
    backend = HTTPBackend("http://server:1", smol_tokenizer, transport=_streaming_server(seen))
    kv = _make(smol_tokenizer, "scb_kv")
    out = backend.generate_turn(kv.turn_prompt(0, []), {"preset": "full", "cache": False})
    path, body = seen[-1]
    assert path == "/v1/completions" and body["prompt"] == kv.prompt_ids[0] and body["max_tokens"] == MAX_NEW
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["kv_policy"] == {"preset": "full", "cache": False}
    assert out.text == " 1234" and out.finish_reason == "stop" and out.prompt_tokens == 70
    assert out.cached_tokens == 64 and out.kv["prefill_ms"] == 3.0 and 0 <= out.ttft_ms <= 1000 * out.seconds
    chat = _make(smol_tokenizer, "scb_multiturn")
    out = backend.generate_turn(chat.turn_prompt(1, ["first"]), None)
    path, body = seen[-1]
    assert path == "/v1/chat/completions" and body["messages"] == chat.messages(1, ["first"])
    assert "kv_policy" not in body and out.text == " 1234"
    with pytest.raises(Rejected, match="Unknown kv_policy preset"):
        backend.generate_turn(kv.turn_prompt(0, []), {"preset": "nope"})
    with pytest.raises(Rejected, match="the policy failed"):
        backend.generate_turn(kv.turn_prompt(0, []), {"preset": "broken"})


def test_wilson_interval_matches_known_values():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)


def _args(*argv):
    parser = argparse.ArgumentParser(prog="kvmux")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_the_engine_gets_a_prefix_cache_only_when_a_run_needs_one():
    assert _args("--tasks", "scb_kv").prefix_cache == "both" and _args().turns == 5
    assert engine_prefix_cache(_args()) is None  # the single-turn tasks, as before
    assert engine_prefix_cache(_args("--tasks", "passkey,scb_multiturn")) == "auto"
    assert engine_prefix_cache(_args("--tasks", "scb_kv", "--prefix-cache", "off")) is None
    assert engine_prefix_cache(_args("--tasks", "passkey", "--prefix-reuse")) == "auto"
    with pytest.raises(SystemExit):
        _args("--prefix-cache", "sometimes")
