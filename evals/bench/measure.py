"""Measuring one generation: time to first token, decode rate, peak memory, KV held, sparsity.

Two measured paths over the same prompt ids and the same number of greedy tokens:
- a kvmux policy session driven directly (`session.prefill` generator, then `session.decode`
  per token), exactly as the engine drives it, with the session's `stats()` read between
  forwards for the peak KV it holds;
- plain transformers `model.generate` (greedy, SDPA attention), timed through a streamer whose
  `put` receives each token on the host (so every timestamp follows a device sync).

Both report TTFT = start -> first generated token on the host, and decode rate = the tokens
after the first / the time after the first; peak memory comes from `probes.py`, the prompts from
`prompts.py`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from kvmux.evals.bench.probes import MemoryProbe, sync
from kvmux.models.loader import eos_token_ids
from kvmux.policies.base import SessionRequest, cache_kept_tokens
from kvmux.policies.hook import ATTENTION_NAME
from kvmux.policies.presets import Preset

BASELINE_NAME = "generate"  # the row of plain transformers model.generate


@dataclass
class RunSample:
    """One measured generation."""

    ttft_s: float
    decode_s: float
    decode_tokens: int
    peak_mem_bytes: int
    peak_mem_delta_bytes: int
    kv_bytes_kept_peak: int
    kv_bytes_full: int
    tokens_kept_peak: int
    kv_bytes_kept_end: int = 0  # what the cache holds after the last token (bounded policies: after evicting)
    tokens: list[int] = field(default_factory=list)
    sparsity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def timed(
        cls, start: float, first: float, end: float, new_tokens: int, memory: tuple[int, int], **figures: Any
    ) -> RunSample:
        """The run that started at `start`, had its first token at `first` and its last at `end`;
        `memory` is the probe's (peak, growth)."""
        peak, delta = memory
        return cls(
            ttft_s=first - start,
            decode_s=end - first,
            decode_tokens=new_tokens - 1,
            peak_mem_bytes=peak,
            peak_mem_delta_bytes=delta,
            **figures,
        )

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None

    def metrics(self) -> dict[str, float | None]:
        """The numeric figures that are summarised over repetitions."""
        return {
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_mem_bytes": float(self.peak_mem_bytes),
            "peak_mem_delta_bytes": float(self.peak_mem_delta_bytes),
            "kv_bytes_kept_peak": float(self.kv_bytes_kept_peak),
            "kv_ratio": self.kv_bytes_kept_peak / self.kv_bytes_full if self.kv_bytes_full else None,
            "tokens_kept_peak": float(self.tokens_kept_peak),
            "kv_bytes_kept_end": float(self.kv_bytes_kept_end),
            "attention_sparsity": self.sparsity,
        }

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


def attention_sparsity(extra: dict[str, Any]) -> float | None:
    """The fraction of attention skipped, from a session's stats extras, if it reports one.

    Accepts a key containing "sparsity" (used as is) or "density" (reported as 1 - density).
    """

    def numeric(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        return float(value)

    for key in sorted(extra, key=lambda k: (k != "attention_sparsity", k)):
        if "sparsity" in key and (value := numeric(extra[key])) is not None:
            return value
    for key in sorted(extra, key=lambda k: (k != "attention_density", k)):
        if "density" in key and (value := numeric(extra[key])) is not None:
            return 1.0 - value
    return None


def _plain_extras(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if isinstance(v, str | int | float | bool) or v is None}


def end_of_sequence_ids(model: torch.nn.Module) -> list[int]:
    """The ids `generate(min_new_tokens=...)` suppresses: the generation config's EOS token(s)."""
    return sorted(eos_token_ids(getattr(model, "generation_config", None)))


def greedy_token(logits: torch.Tensor, suppressed: list[int]) -> int:
    """The argmax token of `logits`, never one of `suppressed` (the caller's logits are left as they are)."""
    if suppressed:
        logits = logits.clone()
        logits[..., suppressed] = float("-inf")
    return int(logits.argmax())


def run_session(
    runner,
    preset: Preset,
    ids: torch.Tensor,
    new_tokens: int,
    probe: MemoryProbe,
    request: SessionRequest,
    suppressed: list[int] | None = None,
) -> RunSample:
    """Prefill `ids` [1, T] through a fresh session of `preset`, then greedy-decode `new_tokens`.

    `suppressed` token ids are never chosen: the baseline's `min_new_tokens` bans EOS until the
    last token, and so must the session for the two to produce the same tokens.
    """
    suppressed = suppressed or []
    device = runner.info.device
    probe.start()
    kv_peak, tokens_peak = 0, 0
    start = time.perf_counter()
    session = preset.policy.new_session(preset.params, runner.info, request)
    try:
        prefill = session.prefill(runner, ids)
        while True:
            try:
                next(prefill)
            except StopIteration as stop:
                logits = stop.value
                break
            stats = session.stats()
            kv_peak, tokens_peak = max(kv_peak, stats.kv_bytes_kept), max(tokens_peak, stats.tokens_kept)
        token = greedy_token(logits, suppressed)
        first = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens - 1):
            logits = session.decode(runner, token)
            token = greedy_token(logits, suppressed)
            tokens.append(token)
            stats = session.stats()
            kv_peak, tokens_peak = max(kv_peak, stats.kv_bytes_kept), max(tokens_peak, stats.tokens_kept)
        sync(device)
        end = time.perf_counter()
        stats = session.stats()
    finally:
        session.close()
    return RunSample.timed(
        start,
        first,
        end,
        new_tokens,
        probe.peak(),
        kv_bytes_kept_peak=max(kv_peak, stats.kv_bytes_kept),
        kv_bytes_full=stats.kv_bytes_full,
        tokens_kept_peak=max(tokens_peak, stats.tokens_kept),
        kv_bytes_kept_end=stats.kv_bytes_kept,
        tokens=tokens,
        sparsity=attention_sparsity(stats.extra),
        extra=_plain_extras(stats.extra),
    )


class _TokenClock(BaseStreamer):
    """Records the host time at which generate hands over the prompt and each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention (e.g. to "sdpa" for the baseline), then back."""
    previous = model.config._attn_implementation or ATTENTION_NAME
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def greedy_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **options: Any):
    """transformers `generate`, greedy, exactly `new_tokens` tokens (EOS banned until then), as a dict output."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        **options,
    )


def run_generate(
    model: torch.nn.Module, info, ids: torch.Tensor, new_tokens: int, probe: MemoryProbe, **options: Any
) -> RunSample:
    """Plain transformers greedy `model.generate` with SDPA attention, exactly `new_tokens` tokens;
    `options` go to generate (e.g. `cache_implementation="static"`)."""
    device = info.device
    ids = ids.to(device)
    clock = _TokenClock()
    with attention_implementation(model, "sdpa"), torch.inference_mode():
        probe.start()
        start = time.perf_counter()
        out = greedy_generate(model, ids, new_tokens, streamer=clock, **options)
        sync(device)
        end = time.perf_counter()
        peak, delta = probe.peak()
    generated = out.sequences[0, ids.shape[1] :].tolist()
    if len(generated) != new_tokens:
        raise RuntimeError(f"generate produced {len(generated)} tokens instead of {new_tokens}")
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    kept_tokens, kept_bytes = cache_kept_tokens(cache)
    first = clock.times[1] if len(clock.times) > 1 else end
    seen = ids.shape[1] + new_tokens - 1  # the last token is never fed back
    return RunSample.timed(
        start,
        first,
        end,
        new_tokens,
        (peak, delta),
        kv_bytes_kept_peak=kept_bytes,
        kv_bytes_full=info.kv_bytes_per_token * seen,
        tokens_kept_peak=kept_tokens,
        kv_bytes_kept_end=kept_bytes,
        tokens=generated,
    )
