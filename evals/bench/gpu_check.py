"""One time-boxed GPU check of every KV policy on a random-weight Llama-3-8B-shaped model.

Run by `scripts/gpu_check.sh` (under 8 minutes on one H100/H200, nothing downloaded):

1. build the `llama3-8b` shape (`shapes.py`) in bf16 on CUDA with random weights;
2. agreement at 16K tokens: transformers `generate` (SDPA, greedy) gives reference tokens and
   per-step logits; every preset (and every registered policy without a preset, at its default
   parameters) prefills the same prompt and is teacher-forced through the reference tokens.
   Reported per step: top-1 agreement, cosine similarity and KL(reference || policy) of the
   logits, and whether they are finite. `full` must agree (it is the same computation); the
   others show how far their approximation moves a model's outputs at this length;
3. speed at 32K/64K/128K: the in-process benchmark (`run.py`, one measured round, the
   check stage serving as warm-up): TTFT, decode tokens/s, peak CUDA memory and KV kept, each
   as a ratio to transformers `generate` at the same length.

Every run is estimated from the same target's previous run (time grows about as length^1.6)
and skipped with a note when it would overrun the budget. Results are written after every
stage and every length, so a run cut short keeps what it measured: `gpu_check.json` +
`gpu_check.md` (agreement), `bench.{json,md,png}` (speed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvmux.cli_args import default_presets_dir, parse_tokens, token_counts
from kvmux.evals.helpers import embedded_tokenizer_dir, load_tokenizer

GROWTH = 1.6  # run time ~ length**GROWTH between lengths (prefill is linear + quadratic)


class Clock:
    """Elapsed time against a budget, and run-time estimates from past runs."""

    def __init__(self, budget_s: float, reserve_s: float = 15.0):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s - reserve_s
        self.runs: dict[str, tuple[int, float]] = {}  # target -> (length, seconds) of its latest run

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, target: str, length: int, seconds: float) -> None:
        self.runs[target] = (length, seconds)

    def estimate(self, target: str, length: int, fallback: str | None = None) -> float | None:
        known = self.runs.get(target) or (self.runs.get(fallback) if fallback else None)
        if known is None:
            return None
        seen_length, seconds = known
        return seconds * (length / seen_length) ** GROWTH * (1.0 if target in self.runs else 2.0)

    def gate(self, target: str, length: int, fallback: str | None = None) -> str | None:
        estimate = self.estimate(target, length, fallback)
        left = self.left()
        if left <= 0:
            return "time budget spent"
        if estimate is not None and estimate > left:
            return f"estimated {estimate:.0f} s > {left:.0f} s left in the budget"
        return None


def say(clock: Clock, message: str) -> None:
    print(f"[{clock.elapsed():6.1f}s] {message}", flush=True)


def targets(presets_dir: Path) -> dict[str, Any]:
    """Every preset, plus each registered policy that no preset uses (at default parameters)."""
    from kvmux.policies.presets import Preset, load_presets
    from kvmux.policies.registry import get_policy, policy_names

    presets = dict(load_presets(presets_dir))
    covered = {p.policy.name for p in presets.values()}
    for name in policy_names():
        if name not in covered:
            policy = get_policy(name)
            presets[f"{name}:defaults"] = Preset(f"{name}:defaults", policy, policy.Params(), "default parameters")
    return presets


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """Per-step agreement of [S, V] logits with the reference [S, V]."""
    ref, got = reference.float(), logits.float()
    finite = bool(torch.isfinite(got).all())
    top1 = (ref.argmax(-1) == got.argmax(-1)).float()
    cos = F.cosine_similarity(ref, got, dim=-1)
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "finite": finite,
        "top1_agreement": float(top1.mean()),
        "first_token_match": bool(top1[0]),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def reference_run(model, ids: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    from kvmux.evals.bench.measure import attention_implementation, greedy_generate

    with attention_implementation(model, "sdpa"), torch.inference_mode():
        out = greedy_generate(model, ids, steps, output_logits=True)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    return tokens, torch.stack([step[0].float() for step in out.logits])


def forced_logits(runner, preset, ids: torch.Tensor, tokens: list[int], request) -> torch.Tensor:
    """Logits [S, V] of a session prefilled with `ids` and fed the reference tokens (teacher forcing)."""
    from kvmux.policies.base import run_prefill

    session = preset.policy.new_session(preset.params, runner.info, request)
    try:
        steps = [run_prefill(session, runner, ids).float()]
        for token in tokens[:-1]:
            steps.append(session.decode(runner, token).float())
        return torch.stack(steps)
    finally:
        session.close()


def agreement_stage(loaded, presets, clock: Clock, length: int, steps: int, chunk: int) -> list[dict[str, Any]]:
    from kvmux.evals.bench.prompts import prompt_ids
    from kvmux.models.runner import Runner
    from kvmux.policies.base import SessionRequest

    model, info = loaded.model, loaded.info
    ids = prompt_ids(length, info.config.vocab_size, 0, loaded.tokenizer).to(info.device)
    request = SessionRequest(prompt_text=loaded.tokenizer.decode(ids[0]) if loaded.tokenizer is not None else None)
    began = time.monotonic()
    ref_tokens, ref_logits = reference_run(model, ids, steps)
    clock.record("generate", length, time.monotonic() - began)
    say(clock, f"reference (transformers generate, sdpa) at {length}: {time.monotonic() - began:.1f} s")
    runner = Runner(model, info, chunk)
    rows = []
    for name, preset in presets.items():
        row: dict[str, Any] = {"preset": name, "policy": preset.policy.name, "length": length, "steps": steps}
        row["params"] = preset.params.model_dump(mode="json")
        if reason := clock.gate(name, length, fallback="generate"):
            rows.append(row | {"status": "skipped", "note": reason})
            say(clock, f"agreement {name}: skipped: {reason}")
            continue
        began = time.monotonic()
        try:
            logits = forced_logits(runner, preset, ids, ref_tokens, request)
        except Exception as exc:  # a policy failing here is the finding; keep checking the others
            rows.append(row | {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:500]})
            say(clock, f"agreement {name}: ERROR {type(exc).__name__}: {exc}")
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        seconds = time.monotonic() - began
        clock.record(name, length, seconds)
        metrics = compare(ref_logits, logits)
        exact = metrics["top1_agreement"] >= 0.875 and metrics["cosine_min"] >= 0.99
        if not metrics["finite"] or (preset.policy.name == "full" and not exact):
            status = "FAIL"
        else:
            status = "pass" if preset.policy.name == "full" else "ran"
        rows.append(row | metrics | {"status": status, "seconds": round(seconds, 2)})
        say(
            clock,
            f"agreement {name}: top-1 {metrics['top1_agreement']:.0%}, cos min {metrics['cosine_min']:.4f}, "
            f"KL mean {metrics['kl_mean']:.4f}, {seconds:.1f} s -> {rows[-1]['status']}",
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--check-length", type=token_counts, default=[16384])
    parser.add_argument("--check-steps", type=int, default=8)
    parser.add_argument("--lengths", type=token_counts, default=[32768, 65536, 131072])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=parse_tokens, default=2048)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--presets-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/results/gpu"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the embedded one)")
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only for a smoke run of a tiny shape")
    args = parser.parse_args(argv)
    clock = Clock(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    from kvmux.evals.bench.report import agreement_markdown, write_report
    from kvmux.evals.bench.run import BenchSettings, environment, model_summary, run_bench
    from kvmux.evals.bench.shapes import build_random_model

    presets = targets(args.presets_dir or default_presets_dir())
    say(clock, f"targets: {list(presets)}")
    longest = max(args.lengths + args.check_length) + max(args.new_tokens, args.check_steps)
    max_context = 1024 * math.ceil(longest / 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer_dir = args.tokenizer or embedded_tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    say(clock, f"prompts: {'text tokenized by ' + str(tokenizer_dir) if tokenizer else 'random ids (no tokenizer)'}")
    loaded = build_random_model(args.shape, device, dtype, 0, max_context, tokenizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        say(
            clock,
            f"built {args.shape} on {torch.cuda.get_device_name()} ({torch.cuda.memory_allocated() / 2**30:.1f} GiB)",
        )
    doc: dict[str, Any] = {
        "kind": "kvmux-gpu-check",
        "shape": args.shape,
        "model": model_summary(loaded.info, f"random weights, shape {args.shape}"),
        "environment": environment(loaded.info.device),
        "prefill_chunk_tokens": args.prefill_chunk,
        "budget_s": args.budget_s,
        "check_length": args.check_length[0],
        "check_steps": args.check_steps,
        "lengths": args.lengths,
        "prompt": f"sentences of common words ({tokenizer_dir})" if tokenizer else "random token ids",
        "command": "scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "agreement": [],
    }

    def save() -> None:
        doc["elapsed_s"] = clock.elapsed()
        (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(agreement_markdown(doc))

    doc["agreement"] = agreement_stage(
        loaded, presets, clock, args.check_length[0], args.check_steps, args.prefill_chunk
    )
    save()
    settings = BenchSettings(
        lengths=tuple(args.lengths), new_tokens=args.new_tokens, repeats=1, warmup=0,
        prefill_chunk_tokens=args.prefill_chunk,
    )  # fmt: skip
    bench = run_bench(
        loaded.model,
        loaded.info,
        presets,
        settings,
        loaded.tokenizer,
        source=f"random weights, shape {args.shape}",
        progress=lambda message: say(clock, message),
        gate=lambda target, length: clock.gate(target, length, fallback="generate"),
        on_run=clock.record,
        checkpoint=lambda partial: write_report(partial | {"command": doc["command"]}, args.out),
    )
    write_report(bench | {"command": doc["command"]}, args.out)
    save()
    failed = [row["preset"] for row in doc["agreement"] if row["status"] in ("FAIL", "error")]
    say(clock, f"done; wrote {args.out}; failed agreement: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
