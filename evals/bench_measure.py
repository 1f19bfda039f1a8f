"""Measuring one generation: time to first token, decode rate, peak memory, KV held, sparsity.

Two measured paths over the same prompt ids and the same number of greedy tokens:
- a kvmux policy session driven directly (`session.prefill` generator, then `session.decode`
  per token), exactly as the engine drives it, with the session's `stats()` read between
  forwards for the peak KV it holds;
- plain transformers `model.generate` (greedy, SDPA attention), timed through a streamer whose
  `put` receives each token on the host (so every timestamp follows a device sync).

Prompts are sentences of common words, tokenized, when the model has a tokenizer, else random
token ids (random-weight shapes). Both report TTFT = start -> first generated token on the
host, and decode rate = the tokens after the first / the time after the first. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA and the process's resident high-water mark on CPU
(Linux `VmHWM`, reset per run through `/proc/self/clear_refs`), each also as the growth over
what was resident at the start.
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

from kvmux.models.loader import eos_token_ids
from kvmux.policies.base import SessionRequest, cache_kept_tokens
from kvmux.policies.hook import ATTENTION_NAME
from kvmux.policies.presets import Preset

BASELINE_NAME = "generate"  # the row of plain transformers model.generate


def _proc_status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one run: CUDA allocator peak, or resident set high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = 0
        self.peak_resettable = True

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_resettable = _reset_rss_peak()
            self.start_bytes = _proc_status_bytes("VmRSS") or 0

    def peak(self) -> tuple[int, int]:
        """(peak bytes, peak minus the bytes held at `start`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM") or 0
        return peak, max(0, peak - self.start_bytes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    tokens: list[int] = field(default_factory=list)
    sparsity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
    peak, delta = probe.peak()
    return RunSample(
        ttft_s=first - start,
        decode_s=end - first,
        decode_tokens=new_tokens - 1,
        peak_mem_bytes=peak,
        peak_mem_delta_bytes=delta,
        kv_bytes_kept_peak=max(kv_peak, stats.kv_bytes_kept),
        kv_bytes_full=stats.kv_bytes_full,
        tokens_kept_peak=max(tokens_peak, stats.tokens_kept),
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


def run_generate(model: torch.nn.Module, info, ids: torch.Tensor, new_tokens: int, probe: MemoryProbe) -> RunSample:
    """Plain transformers greedy `model.generate` with SDPA attention, exactly `new_tokens` tokens."""
    device = info.device
    ids = ids.to(device)
    clock = _TokenClock()
    with attention_implementation(model, "sdpa"), torch.inference_mode():
        probe.start()
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
            return_dict_in_generate=True,
        )
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
    return RunSample(
        ttft_s=first - start,
        decode_s=end - first,
        decode_tokens=new_tokens - 1,
        peak_mem_bytes=peak,
        peak_mem_delta_bytes=delta,
        kv_bytes_kept_peak=kept_bytes,
        kv_bytes_full=info.kv_bytes_per_token * seen,
        tokens_kept_peak=kept_tokens,
        tokens=generated,
    )


QUESTION = "Question: which word appears most often in the text above?"


def prompt_ids(length: int, vocab_size: int, seed: int, tokenizer=None) -> torch.Tensor:
    """A seeded prompt [1, length].

    With a tokenizer: sentences of common words, then the question on its own last line (as a
    long-context request ends), so content-, sentence- and query-aware policies see text. Without
    one (random-weight shapes): random token ids.
    """
    if tokenizer is not None:
        from kvmux.evals.serve_load import make_prompt

        tail = tokenizer("\n" + QUESTION, add_special_tokens=False)["input_ids"]
        body_length = max(0, length - len(tail))
        words, body = body_length, []
        while len(body) < body_length:
            body = tokenizer(make_prompt(words, seed), add_special_tokens=False)["input_ids"]
            words = 2 * words + 1
        ids = torch.tensor([(body[:body_length] + tail)[-length:]])
        if int(ids.max()) >= vocab_size:
            raise ValueError(f"the tokenizer's ids exceed the model's vocabulary ({vocab_size})")
        return ids
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab_size, (1, length), generator=generator)
