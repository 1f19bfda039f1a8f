"""The KV-policy interface: parameters, per-request sessions, and the hooks the engine calls.

A `Policy` is stateless and shared by every request; it validates its `Params` and makes a
`PolicySession` per request. Everything mutable (the KV cache, scores, counters) lives in the
session, so two concurrent requests never see each other's state.

Hooks (defaults give dense full attention):

| hook | default |
|---|---|
| `session.cache` | a `GrowableCache` (every token, every layer; appends without copying the cache) |
| `session.prefill(runner, ids)` | chunked forward (generator; yields between chunks) |
| `session.attention(call)` | dense SDPA over the whole cache |
| `session.forward_done(n)` | counts the n tokens as seen (not while `counts_tokens` is off), then `after_forward` |
| `session.after_forward(n)` | nothing |
| `session.next_position_ids(n)` | absolute positions (tokens seen so far) |
| `session.stats()` | tokens and bytes kept in the cache (`KVStats`: typed `attention_density`, `tokens_retained`) |
| `policy.check_prompt(params, info, request, ids)` | accepts every prompt (checked before queueing, no session) |
| `session.checkpoint()` / `restore(c)` | per-layer cache lengths (a failed batched decode step is undone) |
| `policy.prefix_reuse(params, info, chunk)` | None: nothing shared with the prefix cache (`policies/prefix.py`) |
| `session.export_prefix(n)` / `import_prefix(s)` | clone / adopt every layer's first n keys and values |
| `policy.kv_bytes_needed(params, info, n)` | a full cache of n tokens (admission under the memory budget) |
| `policy.step_bytes_needed(params, info, n, chunk, query_tokens)` | a dense chunk: mask + one head's scores |
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from transformers import DynamicCache
from transformers.cache_utils import Cache

from kvmux.errors import PolicyInputError as PolicyInputError  # policies raise it from here
from kvmux.policies.attention_call import AttentionCall
from kvmux.policies.dense import dense_attention
from kvmux.policies.kv_buffer import GrowableCache
from kvmux.policies.prefix import PrefixReuse, PrefixState, export_cache_prefix, import_cache_prefix

if TYPE_CHECKING:
    from kvmux.models.info import ModelInfo


class Runner(Protocol):
    """What a session needs from the model runner (`kvmux.models.runner.Runner`): a forward pass
    through the session's cache and hooks, and the prefill chunk size."""

    prefill_chunk_tokens: int

    def forward(
        self,
        session: PolicySession,
        input_ids: torch.Tensor,
        all_logits: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class StepInterrupted(Exception):
    """Raised at a layer boundary when the request was cancelled or ran past its deadline."""


class PolicyParams(BaseModel):
    """Base of every policy's parameters: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(slots=True)
class SessionRequest:
    """What a session may know about its request beyond the token ids."""

    query_text: str | None = None  # kv_policy.query: the question, for query-aware policies
    prompt_text: str | None = None  # completions: the prompt; chat: the rendered prompt
    messages: list[dict[str, str]] | None = None  # chat: the request's messages (None for completions)
    query_ids: list[int] | None = None  # query_text tokenized without special tokens (set by the engine)


@dataclass(slots=True)
class KVStats:
    """What a session holds, reported per response and in metrics."""

    tokens_seen: int
    tokens_kept: int  # per layer and KV head (the maximum over layers)
    kv_bytes_kept: int
    kv_bytes_full: int  # what a full cache of every seen token would take
    # fraction of the causal attention map a sparse policy computed (metrics and bench read it)
    attention_density: float | None = None
    # prompt tokens a retrieval policy kept as its context (the rest of the prompt was read and dropped)
    tokens_retained: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # policy-specific figures, reported as they are

    def as_dict(self) -> dict[str, Any]:
        ratio = self.kv_bytes_kept / self.kv_bytes_full if self.kv_bytes_full else 1.0
        out: dict[str, Any] = {
            "tokens_seen": self.tokens_seen,
            "tokens_kept": self.tokens_kept,
            "kv_bytes_kept": self.kv_bytes_kept,
            "kv_bytes_full": self.kv_bytes_full,
            "kv_ratio": round(ratio, 4),
        }
        if self.attention_density is not None:
            out["attention_density"] = round(self.attention_density, 4)
        if self.tokens_retained is not None:
            out["tokens_retained"] = self.tokens_retained
        return {**out, **self.extra}


def cache_kept_tokens(cache: Cache) -> tuple[int, int]:
    """(max tokens per layer, total bytes) held by a transformers cache of K/V tensors."""
    max_tokens, total_bytes = 0, 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if keys is None or not torch.is_tensor(keys) or keys.numel() == 0:
            continue
        max_tokens = max(max_tokens, keys.shape[-2])
        total_bytes += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return max_tokens, total_bytes


class PolicySession:
    """Per-request state and hooks. Subclasses override only what their paper changes."""

    # set by the server: returns True once the request should stop; checked before every layer's
    # attention, so a cancelled or timed-out request stops within one layer of work
    interrupt: Callable[[], bool] | None = None

    def __init__(self, policy: Policy, params: PolicyParams, info: ModelInfo, request: SessionRequest):
        self.policy = policy
        self.params = params
        self.info = info
        self.request = request
        self.tokens_seen = 0  # prompt and generated tokens the request has read (counted by `forward_done`)
        self.counts_tokens = True  # off while a policy runs forwards that read no new request tokens
        self.cache: Cache = self.make_cache()

    # -- cache -----------------------------------------------------------------------------
    def make_cache(self) -> Cache:
        return GrowableCache(config=self.info.config)

    # -- forward hooks -----------------------------------------------------------------------
    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next `num_tokens` tokens: [1, num_tokens] (absolute by default)."""
        start = self.tokens_seen
        return torch.arange(start, start + num_tokens, device=self.info.device).unsqueeze(0)

    def attention(self, call: AttentionCall) -> torch.Tensor:
        """Attention output [B, Tq, Hq, D] for one layer."""
        return dense_attention(call)

    def forward_done(self, num_tokens: int) -> None:
        """The runner calls this after every forward of `num_tokens` new tokens: the session counts
        them as seen (unless `counts_tokens` is off, e.g. for a probe forward) and runs `after_forward`."""
        if self.counts_tokens:
            self.tokens_seen += num_tokens
        self.after_forward(num_tokens)

    def after_forward(self, num_tokens: int) -> None:
        """Called after every forward of `num_tokens` new tokens (evict here, never inside)."""

    # -- phases ------------------------------------------------------------------------------
    def prefill(self, runner: Runner, input_ids: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """Feed the prompt [1, T]; yields between chunks; returns the last logits [vocab]."""
        chunk = self.prefill_chunk_tokens(runner)
        logits = None
        for start in range(0, input_ids.shape[1], chunk):
            logits = runner.forward(self, input_ids[:, start : start + chunk])
            yield
        assert logits is not None, "empty prompt"
        return logits[0, -1]

    def prefill_chunk_tokens(self, runner: Runner) -> int:
        """Tokens per prefill forward."""
        return runner.prefill_chunk_tokens

    def decode(self, runner: Runner, token_id: int) -> torch.Tensor:
        """Feed one generated token; returns the next logits [vocab]."""
        ids = torch.tensor([[token_id]], device=self.info.device)
        return runner.forward(self, ids)[0, -1]

    # -- decode checkpoints (a failed batched decode step is undone, then retried alone) ---------
    def checkpoint(self) -> Any:
        """What `restore` needs to undo one decode step: every layer's cached length."""
        return [_layer_length(layer) for layer in self.cache.layers]

    def restore(self, checkpoint: Any) -> None:
        """Undo a decode step that failed part-way (cache entries appended since `checkpoint`)."""
        for layer, length in zip(self.cache.layers, checkpoint, strict=False):
            if length is not None and _layer_length(layer) not in (None, length):
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    # -- prefix cache (used when the policy's `prefix_reuse` is not None) ------------------------
    def export_prefix(self, length: int) -> PrefixState:
        """A copy of the state after the first `length` prompt tokens (nothing later may change it)."""
        return export_cache_prefix(self.cache, length)

    def import_prefix(self, state: PrefixState, length: int) -> None:
        """Start this fresh session from the first `length` tokens of a state exported by a session of the
        same configuration (`length` < the state's only where the policy declared it truncatable)."""
        import_cache_prefix(self.cache, state, length)
        self.tokens_seen = length

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> KVStats:
        kept, kept_bytes = cache_kept_tokens(self.cache)
        return KVStats(
            tokens_seen=self.tokens_seen,
            tokens_kept=kept,
            kv_bytes_kept=kept_bytes,
            kv_bytes_full=self.info.kv_bytes_per_token * self.tokens_seen,
        )

    def close(self) -> None:
        """Release the cache (called when the request ends, however it ends)."""
        self.cache = DynamicCache()


def _layer_length(layer: Any) -> int | None:
    keys = getattr(layer, "keys", None)
    return keys.shape[-2] if torch.is_tensor(keys) else None


FP32_BYTES = 4


def dense_step_bytes(num_queries: int, num_keys: int) -> int:
    """Transient bytes of one dense SDPA call: the boolean mask and one head's fp32 scores (a bound on a
    fused kernel's working set; SDPA never materialises every head's scores)."""
    return num_queries * num_keys * (1 + FP32_BYTES)


def activation_bytes(info: ModelInfo, num_tokens: int) -> int:
    """Activations one forward of `num_tokens` tokens holds at once (layers run one after another):
    the residual and norm outputs, q/k/v and their rotated copies, and the MLP's three intermediates."""
    config = info.config
    hidden = getattr(config, "hidden_size", None) or info.num_heads * info.head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    qkv = (info.num_heads + 2 * info.num_kv_heads) * info.head_dim
    elem = torch.finfo(info.dtype).bits // 8
    return num_tokens * elem * (3 * intermediate + 4 * hidden + 2 * qkv)


def pass_bytes(info: ModelInfo, num_tokens: int, chunk: int) -> int:
    """Activations of a forward longer than the server's prefill chunk (what a chunked forward would not hold)."""
    return activation_bytes(info, num_tokens) if num_tokens > chunk else 0


def run_prefill(session: PolicySession, runner: Runner, input_ids: torch.Tensor) -> torch.Tensor:
    """Drive a session's prefill to its end in the calling thread; returns the last logits [vocab].

    (`prefill` is a generator so that a scheduler can interleave requests between chunks.)"""
    return drive_to_end(session.prefill(runner, input_ids))


def drive_to_end(steps: Generator[None, None, Any]) -> Any:
    """Run a step generator (one that yields None between units of work) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class Policy:
    """A named KV policy. Subclasses set the class attributes and `session_class`."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""  # arXiv id
    Params: ClassVar[type[PolicyParams]] = PolicyParams
    session_class: ClassVar[type[PolicySession]] = PolicySession
    extends_context: ClassVar[bool] = False  # may read prompts longer than the model's context
    batched_decode: ClassVar[bool] = False  # decode steps may share one forward with other requests
    summary: ClassVar[str] = ""

    def new_session(self, params: PolicyParams, info: ModelInfo, request: SessionRequest) -> PolicySession:
        if not isinstance(params, self.Params):
            raise TypeError(f"{self.name} expects {self.Params.__name__}, got {type(params).__name__}")
        return self.session_class(self, params, info, request)

    def check_prompt(
        self, params: PolicyParams, info: ModelInfo, request: SessionRequest, prompt_ids: list[int]
    ) -> None:
        """Raise PolicyInputError if this request cannot be served (checked before it is queued,
        without building a session)."""

    def prefix_reuse(self, params: PolicyParams, info: ModelInfo, chunk: int) -> PrefixReuse | None:
        """Whether a session's state after a prompt prefix may start a later request (None: never).

        `chunk`: the server's prefill chunk."""
        return None

    def kv_bytes_needed(self, params: PolicyParams, info: ModelInfo, num_tokens: int) -> int:
        """Upper bound of the KV bytes a request of `num_tokens` tokens will hold (admission)."""
        return info.kv_bytes_per_token * num_tokens

    def step_bytes_needed(
        self, params: PolicyParams, info: ModelInfo, num_tokens: int, chunk: int, query_tokens: int = 0
    ) -> int:
        """Upper bound of the transient bytes of this policy's largest step (admission, with the KV).

        `num_tokens`: prompt + completion; `chunk`: the server's prefill chunk; `query_tokens`: the
        tokens of `kv_policy.query`. Counted: what a step materialises beyond one `chunk`-token forward
        of the model (attention scores, masks, copies, longer passes). Default: chunked dense SDPA,
        whose fused kernels never hold the scores; the mask plus one head's fp32 scores as a bound.
        """
        return dense_step_bytes(min(chunk, num_tokens), num_tokens)

    def context_limit(self, params: PolicyParams, info: ModelInfo) -> int | None:
        """Longest prompt this policy accepts (None = unbounded)."""
        return None if self.extends_context else info.max_context
