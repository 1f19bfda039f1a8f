"""Sampling parameters and next-token selection with transformers' logits processors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Temperatures below this sample greedily (as vLLM does): dividing logits by a tiny temperature
# overflows to inf and the softmax to NaN.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI / vLLM semantics; temperature < SAMPLING_EPS = greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report per token (0 = only the chosen)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


class Sampler:
    """Per-request sampler: the processor chain and a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        chain = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            if params.temperature != 1.0:
                chain.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                chain.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                chain.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                chain.append(MinPLogitsWarper(params.min_p))
        self.chain = chain
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, token_ids: torch.Tensor) -> int:
        """logits [V] for the next token; token_ids [T] = prompt + generated so far."""
        scores = self.chain(token_ids[None], logits[None].float())[0] if self.chain else logits.float()
        if self.params.greedy:
            return int(scores.argmax())
        # extreme settings (a repetition penalty near 0, say) can push scores to inf or NaN:
        # sample among the largest scores instead of failing
        scores = scores.nan_to_num(nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # every score was -inf or NaN
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the model's raw distribution, and the `top` best alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, indices = logp.topk(top)
        alternatives = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
    return float(logp[token]), alternatives
