"""Measure LazyEviction (arXiv 2506.15969) against full attention and StreamingLLM on the embedded model.

Three measurements, all teacher-forced on CPU in fp32:

1. Streaming perplexity over the first `--ppl-tokens` tokens of a public-domain novel shipped with
   the evals (`evals/corpus/pride_and_prejudice.txt`), fed through each policy in chunks of
   `--chunk` tokens (the policy's evictions run between chunks), at a KV budget of half the stream.
2. Decode speed at the end of that stream (~4K tokens of context): one token per forward, the
   sessions interleaved step by step so that machine load affects every policy alike.
3. Recall during decoding: a fact is stated in the prompt, then 1K+ tokens of novel text are fed
   as if decoded: the fact is restated every `--ref-every` tokens, except in the last
   `--recall-tail` tokens (longer than the budget); then a question, whose greedy answer must
   contain the fact's value.

Usage: python scripts/measure_lazy_eviction.py [--ppl-tokens 4096] [--recall-samples 6] ...
Writes a Markdown report (default docs/results/lazy_eviction.md) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies.base import SessionRequest, run_prefill
from kvmux.policies.registry import get_policy

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "evals" / "corpus" / "pride_and_prejudice.txt"
RECALL_SETTINGS = ["recall_samples", "recall_tokens", "ref_every", "recall_tail", "recall_budget", "chunk"]
NAMES = ["Harriet", "Barnaby", "Rosalind", "Tobias", "Clementine", "Ignatius", "Philippa", "Augustin"]


def new_session(info, name: str, **params):
    policy = get_policy(name)
    return policy.new_session(policy.Params(**params), info, SessionRequest())


def stream_nlls(session, runner, ids: torch.Tensor, chunk: int) -> list[float]:
    """NLL (nats) of tokens 1.. of ids [1, T], fed `chunk` tokens per forward."""
    nlls: list[float] = []
    last = None
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = runner.forward(session, piece, all_logits=True)[0].log_softmax(-1)
        if last is not None:
            nlls.append(-float(last[piece[0, 0]]))
        nlls.extend((-logits[:-1].gather(-1, piece[0, 1:, None])).flatten().tolist())
        last = logits[-1]
    return nlls


def ppl(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))


def measure_ppl(model, args, text: str) -> tuple[list[dict], dict]:
    tok, info, runner = model.tokenizer, model.info, model.runner()
    ids = tok(text[: args.ppl_tokens * 8], return_tensors="pt").input_ids[:, : args.ppl_tokens]
    half = ids.shape[1] // 2
    configs = [
        ("full", "full", {}),
        (f"streaming_llm 4+{half - 4}", "streaming_llm", dict(sink_tokens=4, window=half - 4)),
        (f"lazy_eviction B={half} W=64", "lazy_eviction", dict(budget=half, window=64)),
        (f"lazy_eviction B={half - 64} W=64 (peak {half})", "lazy_eviction", dict(budget=half - 64, window=64)),
        (f"lazy_eviction B={half} W=auto", "lazy_eviction", dict(budget=half, window="auto")),
    ]
    rows, sessions = [], {}
    for label, name, params in configs:
        session = new_session(info, name, **params)
        started, cpu = time.time(), time.process_time()
        nlls = stream_nlls(session, runner, ids, args.chunk)
        stats = session.stats()
        rows.append(
            dict(
                label=label,
                ppl=ppl(nlls),
                ppl_second_half=ppl(nlls[half - 1 :]),
                peak=stats.extra.get("peak_tokens_kept", stats.tokens_kept),
                kept=stats.tokens_kept,
                window=stats.extra.get("window"),
                window_source=stats.extra.get("window_source"),
                evictions=stats.extra.get("evictions"),
                wall_s=time.time() - started,
                cpu_s=time.process_time() - cpu,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        if label == "full" or name == "streaming_llm" or label.endswith("W=64"):
            sessions[label] = session
    return rows, {"sessions": sessions, "next_ids": tok(text[args.ppl_tokens * 8 :], return_tensors="pt").input_ids}


def measure_decode(model, sessions: dict, next_ids: torch.Tensor, steps: int) -> list[dict]:
    """Interleaved single-token decode steps on the sessions left by the perplexity stream."""
    runner = model.runner()
    times = {label: [] for label in sessions}
    for step in range(steps + 2):
        for label, session in sessions.items():
            started = time.perf_counter()
            session.decode(runner, int(next_ids[0, step]))
            if step >= 2:  # first two steps warm up
                times[label].append(time.perf_counter() - started)
    full = statistics_median(times["full"])
    return [
        dict(
            label=label,
            context=sessions[label].tokens_seen,
            kept=sessions[label].stats().tokens_kept,
            ms_per_token=1000 * statistics_median(t),
            tokens_per_s=1 / statistics_median(t),
            vs_full=full / statistics_median(t),
        )
        for label, t in times.items()
    ]


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def recall_sample(tok, text: str, index: int, args) -> tuple[torch.Tensor, list[torch.Tensor], str, str]:
    """Prompt with the fact; then filler in which the fact is restated every `ref_every` tokens, then
    `recall_tail` tokens of filler without it (longer than the budget), then the question."""
    rng = random.Random(index)
    name, value = NAMES[index % len(NAMES)], str(rng.randint(10000, 99999))
    prompt = f"Before the story begins, note this fact: the secret number of {name} is {value}.\n\n"
    start = 200_000 + index * 9_000
    filler = tok(text[start : start + args.recall_tokens * 8]).input_ids[: args.recall_tokens]
    ref = tok(f" (Remember: the secret number of {name} is {value}.) ").input_ids
    body = len(filler) - args.recall_tail
    pieces = [torch.tensor([filler[i : min(i + args.ref_every, body)] + ref]) for i in range(0, body, args.ref_every)]
    pieces.append(torch.tensor([filler[body:]]))
    question = f"\n\nQuestion: what is the secret number of {name}?\nAnswer: The secret number of {name} is"
    pieces.append(tok(question, return_tensors="pt").input_ids)
    return tok(prompt, return_tensors="pt").input_ids, pieces, value, name


def measure_recall(model, args, text: str) -> list[dict]:
    tok, info, runner = model.tokenizer, model.info, model.runner()
    b = args.recall_budget
    configs = [
        ("full", "full", {}),
        (f"streaming_llm 4+{b - 4}", "streaming_llm", dict(sink_tokens=4, window=b - 4)),
        (f"lazy_eviction B={b - 64} W=64 (peak {b})", "lazy_eviction", dict(budget=b - 64, window=64)),
    ]
    results = {label: [] for label, _, _ in configs}
    for index in range(args.recall_samples):
        prompt, pieces, value, name = recall_sample(tok, text, index, args)
        stream = torch.cat(pieces, dim=1)
        for label, policy, params in configs:
            session = new_session(info, policy, **params)
            run_prefill(session, runner, prompt)
            logits = None
            for start in range(0, stream.shape[1], args.chunk):
                logits = runner.forward(session, stream[:, start : start + args.chunk])[0, -1]
            answer = []
            for _ in range(8):
                token = int(logits.argmax())
                answer.append(token)
                logits = session.decode(runner, token)
            reply = tok.decode(answer)
            results[label].append(
                dict(ok=value in reply.replace(" ", ""), reply=reply, value=value, tokens=session.tokens_seen)
            )
            print(label, index, value, repr(reply), session.stats().as_dict(), flush=True)
    return [
        dict(
            label=label,
            accuracy=sum(r["ok"] for r in rows) / len(rows),
            samples=len(rows),
            tokens=rows[0]["tokens"],
            replies=[r["reply"] for r in rows],
        )
        for label, rows in results.items()
    ]


def report(results: dict) -> str:
    ppl_rows, decode_rows, recall_rows = results["ppl"], results["decode"], results["recall"]
    ps, rs = argparse.Namespace(**results["ppl_settings"]), argparse.Namespace(**results["recall_settings"])
    lines = [
        "# LazyEviction on the embedded model (SmolLM2-135M-Instruct, CPU, fp32)",
        "",
        "Produced by `python scripts/measure_lazy_eviction.py "
        f"--ppl-tokens {ps.ppl_tokens} --chunk {ps.chunk} --threads {ps.threads} --recall-samples "
        f"{rs.recall_samples} --recall-tokens {rs.recall_tokens} --ref-every {rs.ref_every} "
        f"--recall-tail {rs.recall_tail} --recall-budget {rs.recall_budget}`.",
        "",
        f"## Streaming perplexity ({ps.ppl_tokens} tokens of *Pride and Prejudice*, chunks of {ps.chunk})",
        "",
        "Teacher-forced; evictions run between chunks. Budget = half the stream. LazyEviction's cache",
        "swings between B and B + W, so it is shown both at B = half (peak half + 64) and at a peak of half.",
        "Nothing is evicted before the cache passes the budget, so the policies differ only in the second",
        "half. `W=auto (decode)`: no prompt to calibrate from, so W came from the recorder's own state when",
        "the cache first passed B. CPU s: process CPU time of the run (one thread; the machine was shared).",
        "",
        "| policy | ppl | ppl 2nd half | vs full | KV peak | KV at end | W | evictions | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    full = ppl_rows[0]["ppl"]
    for row in ppl_rows:
        window = "" if row["window"] is None else f"{row['window']} ({row['window_source']})"
        evictions = "" if row["evictions"] is None else row["evictions"]
        lines.append(
            f"| {row['label']} | {row['ppl']:.3f} | {row['ppl_second_half']:.3f} "
            f"| {100 * (row['ppl'] / full - 1):+.2f}% | {row['peak']} | {row['kept']} | {window} | {evictions} "
            f"| {row['cpu_s']:.0f} |"
        )
    lines += [
        "",
        f"## Decode speed at ~{decode_rows[0]['context']} tokens of context (one token per forward)",
        "",
        "Median over interleaved steps on a shared 2-core CPU (rough; the official figures come from `kvmux bench`).",
        "",
        "| policy | KV held | ms/token | tokens/s | vs full |",
        "|---|---|---|---|---|",
    ]
    for row in decode_rows:
        lines.append(
            f"| {row['label']} | {row['kept']} | {row['ms_per_token']:.1f} | {row['tokens_per_s']:.2f} "
            f"| {row['vs_full']:.2f} |"
        )
    lines += [
        "",
        f"## Recall during decoding ({recall_rows[0]['samples']} samples, ~{recall_rows[0]['tokens']} tokens each)",
        "",
        "Prompt: one fact (`the secret number of <name> is <5 digits>`). Then "
        f"{rs.recall_tokens} tokens of novel text fed as decode steps (chunks of {rs.chunk}); the first",
        f"{rs.recall_tokens - rs.recall_tail} are followed every {rs.ref_every} tokens by "
        "`(Remember: the secret number of <name> is <digits>.)`,",
        f"the last {rs.recall_tail} (more than the budget) never mention it; then the question. The greedy",
        f"answer (8 tokens) must contain the digits. KV budget {rs.recall_budget} tokens at the peak.",
        "",
        "| policy | accuracy | answers |",
        "|---|---|---|",
    ]
    for row in recall_rows:
        answers = "; ".join(a.strip().replace("|", "/").replace("\n", " ") for a in row["replies"])
        lines.append(f"| {row['label']} | {row['accuracy']:.2f} | {answers} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ppl,recall", help="ppl (with decode speed), recall, or none")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--recall-samples", type=int, default=4)
    parser.add_argument("--recall-tokens", type=int, default=1100, help="filler tokens fed as decode steps")
    parser.add_argument("--ref-every", type=int, default=150, help="fact restated every this many tokens")
    parser.add_argument("--recall-tail", type=int, default=450, help="last filler tokens without the fact")
    parser.add_argument("--recall-budget", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lazy_eviction.md")
    args = parser.parse_args()
    parts = set(args.parts.split(",")) & {"ppl", "recall"}  # none: only re-render the report from the JSON
    torch.set_num_threads(args.threads)
    model = load_model(ModelSpec(device="cpu", dtype="float32")) if parts else None
    text = CORPUS.read_text(encoding="utf-8")
    # parts can run separately (e.g. in parallel); each run merges its results into the JSON file
    mine: dict = {}
    if "ppl" in parts:
        mine["ppl"], kept = measure_ppl(model, args, text)
        mine["decode"] = measure_decode(model, kept["sessions"], kept["next_ids"], args.decode_steps)
        mine["ppl_settings"] = dict(ppl_tokens=args.ppl_tokens, chunk=args.chunk, threads=args.threads)
        print(json.dumps(mine["decode"]), flush=True)
    if "recall" in parts:
        mine["recall"] = measure_recall(model, args, text)
        mine["recall_settings"] = {k: getattr(args, k) for k in RECALL_SETTINGS}
    results_path = args.out.with_suffix(".json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(mine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if {"ppl", "decode", "recall"} <= set(results):
        markdown = report(results)
        args.out.write_text(markdown, encoding="utf-8")
        print(markdown)


if __name__ == "__main__":
    main()
