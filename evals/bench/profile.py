"""`kvmux bench --profile-decode K`: where the time of one decode token goes.

For every preset (a kvmux session driven as the bench drives it) and for transformers `generate`
(SDPA, dynamic cache), at each length: prefill the bench's seeded prompt, decode `WARM_STEPS`
tokens, time K decode steps plainly (ms per token without the profiler), then run K more under
`torch.profiler` and split their wall time per token into:

- `matmul`: matrix products (linear, mm, addmm, bmm, matmul, ...);
- `attention`: scaled_dot_product_attention and its kernels, softmax, flex attention;
- `cache_copy_index`: copies, concatenation, indexing/gather/scatter, slicing and views;
- `other_kernels`: every other operator (norms, activations, rotary arithmetic, sampling, ...);
- `outside_kernels`: the wall time not spent inside any operator: Python, the dispatcher between
  ops, generate's or the session's own bookkeeping.

On CPU the time inside an operator is its self CPU time (operators run on the calling thread;
their intra-op threads are inside that time); on CUDA it is the kernel time the operator launched
(self device time), so `outside_kernels` there is the time the GPU is not busy. The five parts sum
to the profiled wall time per token. The profiler adds a little time per operator, so the
profiled wall is above the plain one; both are reported. `generate`'s steps are delimited by its
streamer (which hears each new token), so its own per-step work (logits processors, stopping
criteria) counts as it does for a user.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.generation.streamers import BaseStreamer

from kvmux.evals.bench.measure import BASELINE_NAME, attention_implementation, greedy_generate, greedy_token
from kvmux.evals.bench.probes import sync
from kvmux.evals.helpers import fmt
from kvmux.policies.base import run_prefill

CATEGORIES = ("matmul", "attention", "cache_copy_index", "other_kernels", "outside_kernels")
WARM_STEPS = 3
_MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv", "dot", "addbmm", "_addmm_activation"}
_ATTENTION = ("scaled_dot_product", "_flash_attention", "_efficient_attention", "flex_attention", "softmax")
_CACHE = {"copy_", "cat", "clone", "contiguous", "_to_copy", "to", "stack", "narrow", "roll", "fill_", "zero_"}
_CACHE_PREFIXES = ("index", "gather", "scatter", "slice", "select", "masked_", "as_strided", "view", "reshape")
_VIEWS = {"expand", "unsqueeze", "squeeze", "transpose", "permute", "t", "split", "chunk", "unbind", "unflatten"}


def categorize(op_name: str) -> str:
    """The category of an operator name such as 'aten::addmm'."""
    name = op_name.split("::", 1)[-1]
    if any(key in name for key in _ATTENTION):
        return "attention"
    if name in _MATMUL:
        return "matmul"
    if name in _CACHE or name in _VIEWS or name.startswith(_CACHE_PREFIXES):
        return "cache_copy_index"
    return "other_kernels"


def breakdown(ops: list[tuple[str, float]], wall_s: float, steps: int) -> dict[str, Any]:
    """ms per token by category from (operator name, seconds inside it) over `steps` profiled tokens."""
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds in ops:
        per_category[categorize(name)] += seconds
    inside = sum(per_category.values())
    per_category["outside_kernels"] = max(0.0, wall_s - inside)
    top: dict[str, float] = {}
    for name, seconds in ops:
        top[name] = top.get(name, 0.0) + seconds
    return {
        "wall_ms_per_token": wall_s * 1e3 / steps,
        "ms_per_token": {k: v * 1e3 / steps for k, v in per_category.items()},
        "top_ops_ms_per_token": {
            name: s * 1e3 / steps for name, s in sorted(top.items(), key=lambda kv: -kv[1])[:8] if s > 0
        },
    }


def _operator_times(prof, device: torch.device) -> list[tuple[str, float]]:
    """(operator, seconds inside it) for every aten operator the profiler saw."""
    out = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        micros = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        out.append((event.key, micros / 1e6))
    return out


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_session(runner, preset, ids: torch.Tensor, steps: int, request, suppressed: list[int]) -> dict[str, Any]:
    """Prefill `ids`, decode WARM_STEPS tokens, time `steps` plainly, then `steps` more profiled."""
    device = runner.info.device
    session = preset.policy.new_session(preset.params, runner.info, request)
    try:
        token = greedy_token(run_prefill(session, runner, ids), suppressed)

        def decode(n: int) -> float:
            nonlocal token
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                token = greedy_token(session.decode(runner, token), suppressed)
            sync(device)
            return time.perf_counter() - start

        decode(WARM_STEPS)
        plain = decode(steps)
        with profile(activities=_activities(device)) as prof:
            wall = decode(steps)
    finally:
        session.close()
    return {"plain_ms_per_token": plain * 1e3 / steps, **breakdown(_operator_times(prof, device), wall, steps)}


class _StepProfiler(BaseStreamer):
    """Streamer that times generate's decode steps: plain ones, then profiled ones."""

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device, self.times = steps, device, []
        self.prof = profile(activities=_activities(device))

    def put(self, value) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())
        # times[0]: prompt; [1]: first token; then WARM_STEPS, `steps` plain and `steps` profiled tokens
        if len(self.times) == 2 + WARM_STEPS + self.steps:
            self.prof.start()
        elif len(self.times) == 2 + WARM_STEPS + 2 * self.steps:
            self.prof.stop()

    def end(self) -> None:
        pass


def profile_generate(model: torch.nn.Module, info, ids: torch.Tensor, steps: int) -> dict[str, Any]:
    """transformers `generate` (SDPA, dynamic cache), its decode steps timed and profiled as a session's."""
    clock = _StepProfiler(steps, info.device)
    with attention_implementation(model, "sdpa"), torch.inference_mode():
        greedy_generate(model, ids.to(info.device), 1 + WARM_STEPS + 2 * steps, streamer=clock)
    t = clock.times
    first_plain = 1 + WARM_STEPS
    plain = t[first_plain + steps] - t[first_plain]
    wall = t[first_plain + 2 * steps] - t[first_plain + steps]
    ops = _operator_times(clock.prof, info.device)
    return {"plain_ms_per_token": plain * 1e3 / steps, **breakdown(ops, wall, steps)}


def profile_markdown(doc: dict[str, Any]) -> str:
    """The profile table: one row per (length, target), ms per token by category."""
    head = " | ".join(f"{c} ms" for c in CATEGORIES)
    lines = [
        f"# kvmux decode profile: {doc['model']['name']}",
        "",
        f"- {doc['steps']} decode steps per row after {WARM_STEPS} warm-up steps, {doc['environment']['device']}, "
        f"torch {doc['environment']['torch']}, {doc['environment']['torch_threads']} threads",
        "- ms per token; `plain`: without the profiler; the categories split the profiled wall time "
        "(see evals/bench/profile.py); `outside_kernels` = Python and dispatch between operators",
    ]
    if doc.get("command"):
        lines.append(f"- command: `{doc['command']}`")
    lines += ["", f"| length | target | plain ms | profiled ms | {head} | top operators |"]
    lines.append("|---:|---|" + "---:|" * 7 + "---|")
    for row in doc["results"]:
        if row.get("error"):
            lines.append(f"| {row['length']} | {row['target']} |" + " – |" * 7 + f" {row['error']} |")
            continue
        parts = " | ".join(fmt(row["ms_per_token"][c], ".2f") for c in CATEGORIES)
        top = ", ".join(f"{n.removeprefix('aten::')} {v:.2f}" for n, v in list(row["top_ops_ms_per_token"].items())[:4])
        lines.append(
            f"| {row['length']} | {row['target']} | {row['plain_ms_per_token']:.2f} | {row['wall_ms_per_token']:.2f} "
            f"| {parts} | {top} |"
        )
    return "\n".join(lines) + "\n"


def run_profile(
    model, info, presets, lengths, steps: int, tokenizer=None, prefill_chunk: int = 2048, progress=None, lean=True
):
    """Profile `generate` and every preset at every length; returns the document (kind kvmux-decode-profile)."""
    from kvmux.evals.bench.measure import end_of_sequence_ids
    from kvmux.evals.bench.prompts import prompt_ids
    from kvmux.evals.bench.run import environment, model_summary
    from kvmux.models.runner import Runner
    from kvmux.policies.base import SessionRequest

    say = progress or (lambda message: None)
    runner, suppressed = Runner(model, info, prefill_chunk, lean), end_of_sequence_ids(model)
    vocab = int(getattr(info.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    rows = []
    for length in lengths:
        ids = prompt_ids(length, vocab, 0, tokenizer)
        request = SessionRequest(prompt_text=tokenizer.decode(ids[0]) if tokenizer else None, query_text=None)
        jobs = {BASELINE_NAME: lambda ids=ids: profile_generate(model, info, ids, steps)}
        for name, preset in presets.items():
            jobs[name] = lambda p=preset, ids=ids, r=request: profile_session(runner, p, ids, steps, r, suppressed)
        for name, job in jobs.items():
            try:
                row = {"target": name, "length": length, **job()}
            except Exception as exc:  # one target's failure is its row's note
                row = {"target": name, "length": length, "error": f"{type(exc).__name__}: {exc}"}
            say(f"profile len={length} {name}: {row.get('wall_ms_per_token', 0):.2f} ms/token {row.get('error', '')}")
            rows.append(row)
    return {
        "kind": "kvmux-decode-profile",
        "version": 1,
        "environment": environment(info.device),
        "model": model_summary(info, ""),
        "steps": steps,
        "categories": list(CATEGORIES),
        "results": rows,
    }


def write_profile(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """decode_profile.json and decode_profile.md under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "decode_profile.json", "md": out_dir / "decode_profile.md"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["md"].write_text(profile_markdown(doc))
    return paths
