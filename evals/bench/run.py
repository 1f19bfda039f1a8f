"""`kvmux bench`, in-process: speed and memory of every preset against plain transformers generate.

For each prompt length, every preset and the baseline (transformers `model.generate`, greedy,
SDPA) generate the same number of greedy tokens from the same seeded prompt. Runs are
interleaved (baseline, preset 1, preset 2, ... then again) so slow drifts of a shared machine
hit every target alike; the first `warmup` rounds are discarded. Each figure is summarised over
the `repeats` measured rounds (median, min, max, mean, stdev) and divided by the baseline's
median from the same run: absolute times on a noisy machine mean little, ratios do.

Figures: TTFT (prefill + first token), decode tokens/s, peak process memory (and its growth
over the start of the run), peak KV bytes kept vs a full cache, and the attention sparsity a
session reports; the report adds the prompt tokens read per second (length / TTFT), the figure
that shows whether reading cost is linear in length. `baseline_max_tokens` leaves the baseline
out above a length (dense attention far beyond the model's context is slow and not the point).
Also recorded: the share of greedy tokens equal to the baseline's (a cheap sanity check: `full`
should match; eviction policies may not). Sessions decode greedily with the EOS token(s) banned,
as the baseline's `min_new_tokens` bans them, so both produce the same number of tokens from the
same choices.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from kvmux.evals.bench.measure import BASELINE_NAME, RunSample, end_of_sequence_ids, run_generate, run_session
from kvmux.evals.bench.peers import STATIC_PEERS, PeerError, peer_params, peer_runner
from kvmux.evals.bench.probes import MemoryProbe
from kvmux.evals.bench.prompts import prompt_ids
from kvmux.evals.bench.roofline import add_roofline, decode_weight_bytes, measure_bandwidth
from kvmux.models.runner import Runner
from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.presets import Preset

# figures divided by the baseline's; for decode rate higher is better, for the others lower is
TEXT_PROMPT = "seeded sentences of common words + a question line"
RATIO_METRICS = ("ttft_s", "decode_tokens_per_s", "peak_mem_bytes", "peak_mem_delta_bytes", "kv_bytes_kept_peak")


@dataclass(frozen=True)
class BenchSettings:
    lengths: tuple[int, ...]
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    prefill_chunk_tokens: int = 2048
    seed: int = 0
    # the baseline is not run above this many prompt tokens (None: always run); for long
    # prompts where dense attention is too slow or beyond the model, ratios are then absent
    baseline_max_tokens: int | None = None
    # transformers peer rows run beside the baseline (peers.STATIC_PEERS), same length limit
    peers: tuple[str, ...] = ()
    bandwidth_mib: int | None = None  # tensor measured for the roofline (None: roofline.py's default)
    lean_decode: bool = True  # decode steps through kvmux's lean layer loop (False: the model's forward)

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("lengths must be positive token counts")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be at least 2 (one for TTFT, the rest for the decode rate)")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if unknown := set(self.peers) - set(STATIC_PEERS):
            raise ValueError(f"unknown peer(s) {sorted(unknown)}; known: {', '.join(STATIC_PEERS)}")


def summarize(values: list[float | None]) -> dict[str, float | int | None]:
    """Median and spread of the non-missing values."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"n": 0, "median": None, "min": None, "max": None, "mean": None, "stdev": None}
    return {
        "n": len(present),
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "mean": statistics.fmean(present),
        "stdev": statistics.stdev(present) if len(present) > 1 else 0.0,
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _token_agreement(tokens: list[int], reference: list[int]) -> float | None:
    if not tokens or not reference:
        return None
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n], strict=True)) / n


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def model_summary(info, source: str) -> dict[str, Any]:
    return {
        "name": info.served_name,
        "source": source,
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "max_context": info.max_context,
        "dtype": str(info.dtype).removeprefix("torch."),
        "device": str(info.device),
        "kv_bytes_per_token": info.kv_bytes_per_token,
    }


class _Target:
    """One row of the table: the baseline, a transformers peer or a preset at one length, with its samples."""

    def __init__(self, name: str, preset: Preset | None, length: int, params: dict[str, Any] | None = None):
        self.name = name
        self.preset = preset
        self.length = length
        self.params = params or {"attn_implementation": "sdpa"}
        self.samples: list[RunSample] = []
        self.status = "ok"
        self.note = ""
        self.stopped = False

    def row(self, baseline: _Target | None) -> dict[str, Any]:
        metrics = [s.metrics() for s in self.samples]
        summary = {key: summarize([m[key] for m in metrics]) for key in (metrics[0] if metrics else {})}
        row: dict[str, Any] = {
            "preset": self.name,
            "policy": self.preset.policy.name if self.preset else "transformers",
            "params": self.preset.params.model_dump(mode="json") if self.preset else self.params,
            "length": self.length,
            "status": self.status,
            "note": self.note,
            "summary": summary,
            "samples": [s.as_dict() for s in self.samples],
        }
        if baseline is not None and baseline.samples and summary:
            base = {k: summarize([s.metrics()[k] for s in baseline.samples]) for k in RATIO_METRICS}
            row["ratios"] = {k: ratio(summary[k]["median"], base[k]["median"]) for k in RATIO_METRICS}
            row["tokens_match_baseline"] = _token_agreement(self.samples[0].tokens, baseline.samples[0].tokens)
        return row


def _preset_summary(preset: Preset) -> dict[str, Any]:
    return {k: v for k, v in preset.as_dict().items() if k != "schema"}


def _skip_reason(preset: Preset, info, length: int, new_tokens: int) -> str | None:
    limit = preset.policy.context_limit(preset.params, info)
    if limit is not None and length + new_tokens > limit:
        return f"prompt + output ({length} + {new_tokens}) exceeds the policy's context limit {limit}"
    return None


def _document(
    info, source: str, settings: BenchSettings, memory_measure: str, text_prompts: bool, presets, started, rows, machine
) -> dict[str, Any]:
    return {
        "roofline": machine,
        "kind": "kvmux-bench",
        "version": 1,
        "created": started.isoformat(timespec="seconds"),
        "environment": environment(info.device),
        "model": model_summary(info, source),
        "settings": {
            "lengths": list(settings.lengths),
            "new_tokens": settings.new_tokens,
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "prefill_chunk_tokens": settings.prefill_chunk_tokens,
            "seed": settings.seed,
            "baseline_max_tokens": settings.baseline_max_tokens,
            "peers": list(settings.peers),
            "lean_decode": settings.lean_decode,
            "memory_measure": memory_measure,
            "baseline": f"{BASELINE_NAME}: transformers model.generate, greedy, attn_implementation=sdpa",
            "prompt": TEXT_PROMPT if text_prompts else "seeded random token ids",
        },
        "presets": {name: _preset_summary(preset) for name, preset in presets.items()},
        "results": rows,
    }


def run_bench(
    model: torch.nn.Module,
    info,
    presets: dict[str, Preset],
    settings: BenchSettings,
    tokenizer=None,
    source: str = "",
    progress: Callable[[str], None] | None = None,
    gate: Callable[[str, int], str | None] | None = None,
    on_run: Callable[[str, int, float], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every preset and the baseline at every length; returns the results document.

    `gate(target, length)` may return a reason to skip a run (time budgets); `on_run(target,
    length, seconds)` hears the wall time of every run, warm-up included; `checkpoint(doc)`
    receives the document of the lengths finished so far, after each length.
    """
    say = progress or (lambda message: None)
    runner = Runner(model, info, settings.prefill_chunk_tokens, settings.lean_decode)
    probe = MemoryProbe(info.device)
    suppressed = end_of_sequence_ids(model)  # as generate's min_new_tokens does
    vocab = int(getattr(info.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    rows: list[dict[str, Any]] = []
    started = datetime.datetime.now(datetime.UTC)

    def document(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return _document(info, source, settings, probe.kind, tokenizer is not None, presets, started, rows, machine)

    machine = measure_bandwidth(info.device, settings.bandwidth_mib) | {"weight_bytes": decode_weight_bytes(model)}
    say(f"memory bandwidth {machine['bytes_per_s'] / 1e9:.1f} GB/s, weights per token {machine['weight_bytes']:,} B")

    for length in settings.lengths:
        ids = prompt_ids(length, vocab, settings.seed, tokenizer)
        text = tokenizer.decode(ids[0]) if tokenizer is not None else None
        request = SessionRequest(prompt_text=text, query_text=None)
        baseline = _Target(BASELINE_NAME, None, length)
        if settings.baseline_max_tokens is not None and length > settings.baseline_max_tokens:
            baseline.status = "skipped"
            baseline.note = f"baseline not run above {settings.baseline_max_tokens} prompt tokens"
        elif length + settings.new_tokens > info.max_context:
            baseline.note = f"beyond the model's context ({info.max_context}); timed all the same"
        peers = [_Target(name, None, length, peer_params(name, info.device)) for name in settings.peers]
        for peer in peers:
            peer.status, peer.note = baseline.status, baseline.note
        targets = [baseline, *peers] + [_Target(name, preset, length) for name, preset in presets.items()]
        for target in targets[1 + len(peers) :]:
            if reason := _skip_reason(target.preset, info, length, settings.new_tokens):
                target.status, target.note = "skipped", reason
        rounds = settings.warmup + settings.repeats
        for round_idx in range(rounds):
            measured = round_idx >= settings.warmup
            for target in targets:
                if target.status != "ok" or target.stopped:
                    continue
                label = f"len={length} {'rep' if measured else 'warmup'} {round_idx + 1}/{rounds} {target.name}"
                if gate is not None and (reason := gate(target.name, length)):
                    if target.samples:  # keep what was measured; run no more rounds
                        target.note, target.stopped = f"{len(target.samples)} round(s) only: {reason}", True
                    else:
                        target.status, target.note = "skipped", reason
                    say(f"{label}: skipped: {reason}")
                    continue
                began = time.perf_counter()
                try:
                    if target.name in STATIC_PEERS:
                        sample = peer_runner(target.name)(model, info, ids, settings.new_tokens, probe)
                    elif target.preset is None:
                        sample = run_generate(model, info, ids, settings.new_tokens, probe)
                    else:
                        sample = run_session(
                            runner, target.preset, ids, settings.new_tokens, probe, request, suppressed
                        )
                except (PolicyInputError, torch.OutOfMemoryError, RuntimeError, ValueError) as exc:
                    target.status = "error"
                    target.note = str(exc) if isinstance(exc, PeerError) else f"{type(exc).__name__}: {exc}"
                    target.samples.clear()
                    say(f"{label}: {target.note}")
                    gc.collect()
                    if info.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if on_run is not None:
                    on_run(target.name, length, time.perf_counter() - began)
                if measured:
                    target.samples.append(sample)
                tps = sample.decode_tokens_per_s
                say(f"{label}: ttft {sample.ttft_s * 1e3:.1f} ms, decode {tps or 0:.1f} tok/s")
        base_ref = baseline if baseline.status == "ok" and baseline.samples else None
        rows.extend(
            add_roofline(target.row(base_ref), machine["weight_bytes"], machine["bytes_per_s"]) for target in targets
        )
        if checkpoint is not None:
            checkpoint(document(list(rows)))
    return document(rows)
