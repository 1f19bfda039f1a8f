"""Teacher-forced perplexity along a long stream, fed through a policy session.

StreamingLLM (Xiao et al., 2024, https://arxiv.org/abs/2309.17453, §4.1, Fig. 3/5) feeds a long
text token by token through the cache policy and reports the perplexity of each next token as
the stream grows past the cache budget and past the model's trained context. We do the same with
`Runner.forward(session, chunk, all_logits=True)`: the logits of position i score token i+1,
and the policy's `after_forward` (its evictions) runs after every chunk.

`chunk` sets how many tokens go in per forward:
- `chunk=1` is the paper's setting: every token is predicted from exactly what the policy kept
  after the previous token;
- `chunk=c > 1` is up to c times faster but evictions happen only between chunks, so a token
  inside a chunk also sees the up to c-1 chunk tokens before it that the policy might already
  have evicted token by token. For a budget B this is a window of B..B+c-1 tokens instead of B;
  keep c small next to the budget (e.g. 32-128 for a 1K window) when comparing policies.
Perplexity is reported overall and for consecutive windows of `window` predicted tokens.

`generate_after_stream` is the same feeding with a question at its end: a sample's prompt is
prefilled up to `Sample.decode_from`, the rest fed through forwards of `chunk` tokens as decoding
feeds them (the policy evicts between them), then the answer is decoded greedily (the
decode_recall task: does a fact stated in the prompt survive what was decoded after it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvmux.evals.quality.backends import Generation
from kvmux.evals.quality.scoring import perplexity
from kvmux.evals.tasks.common import Sample
from kvmux.policies.base import run_prefill


def token_nlls(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Negative log-likelihoods (nats) of `targets` [T] under `logits` [T, V]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (-logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).tolist()


def stream_nlls(
    session: Any,
    runner: Any,
    ids: list[int],
    chunk: int = 1,
    on_chunk: Callable[[int], None] | None = None,
) -> list[float]:
    """NLL of every token after the first, predicted through `session` (len(ids) - 1 values)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    device = runner.info.device
    nlls: list[float] = []
    previous_last: torch.Tensor | None = None  # logits of the last token of the previous chunk
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start : start + chunk]], device=device)
        logits = runner.forward(session, piece, all_logits=True)[0]
        if previous_last is not None:
            nlls.extend(token_nlls(previous_last.unsqueeze(0), piece[0, :1]))
        if piece.shape[1] > 1:
            nlls.extend(token_nlls(logits[:-1], piece[0, 1:]))
        previous_last = logits[-1]
        if on_chunk is not None:
            on_chunk(piece.shape[1])
    return nlls


def window_perplexities(nlls: list[float], window: int) -> list[dict[str, float]]:
    """Perplexity of consecutive windows; `end` is the stream position of the window's last token."""
    out = []
    for start in range(0, len(nlls), window):
        part = nlls[start : start + window]
        out.append({"end": start + len(part), "tokens": len(part), "ppl": perplexity(part)})
    return out


def measure_stream(
    session: Any,
    runner: Any,
    ids: list[int],
    chunk: int = 1,
    window: int = 256,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Stream `ids` through the session; overall and windowed perplexity and the final KV stats."""
    try:
        nlls = stream_nlls(session, runner, ids, chunk, on_chunk)
        stats = session.stats().as_dict()
    finally:
        session.close()
    return {
        "tokens": len(ids),
        "chunk": chunk,
        "window": window,
        "ppl": perplexity(nlls),
        "windows": window_perplexities(nlls, window),
        "kv": stats,
    }


def generate_after_stream(backend: Any, sample: Sample, kv_policy: dict[str, Any] | None, chunk: int) -> Generation:
    """Prefill `sample.prompt_ids[:decode_from]`, feed the rest `chunk` tokens per forward, then decode
    greedily up to `sample.max_new_tokens` tokens (stopping at the end-of-sequence token)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    session, runner = backend.open_session(kv_policy)
    device, ids, start = runner.info.device, sample.prompt_ids, sample.decode_from or len(sample.prompt_ids)
    stop = backend.tokenizer.eos_token_id
    started = time.perf_counter()
    try:
        logits = run_prefill(session, runner, torch.tensor([ids[:start]], device=device))
        for begin in range(start, len(ids), chunk):
            logits = runner.forward(session, torch.tensor([ids[begin : begin + chunk]], device=device))[0, -1]
        tokens: list[int] = []
        finish = "length"
        while len(tokens) < sample.max_new_tokens:
            token = int(logits.argmax())
            if token == stop:
                finish = "stop"
                break
            tokens.append(token)
            if len(tokens) < sample.max_new_tokens:
                logits = session.decode(runner, token)
        kv = session.stats().as_dict()
    finally:
        session.close()
    return Generation(
        text=backend.tokenizer.decode(tokens, skip_special_tokens=True),
        prompt_tokens=len(ids),
        completion_tokens=len(tokens),
        finish_reason=finish,
        seconds=time.perf_counter() - started,
        kv=kv,
    )
