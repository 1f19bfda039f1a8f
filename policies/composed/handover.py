"""The hand-over of a composed preset: the K/V its prefill part leaves become its decode part's first cache.

Composable policies and the cache each one leaves after a prefill or decodes from (`CACHE_KIND`):
- `plain`: full, flexprefill, hip, lazy_eviction. Every token's K/V in order, keys rotated at their
  absolute positions 0..T-1 (the growable cache of `kv_buffer.py`; a sliding-window layer of the model
  holds its last tokens only).
- `sink_window`: streaming_llm. The first `sink_tokens` and the last `window` tokens (the ring of
  `sink_window_cache.py`); keys stored un-rotated (`positions: cache`) or rotated at their absolute
  positions (`positions: original`).

Every pair of composable policies is valid; the hand-over converts between the two kinds:
- plain -> plain: the decode part adopts the prefill part's cache object (no copy).
- plain -> sink_window: the first `sink_tokens` and last `window` prompt tokens are written to the
  decode part's ring (un-rotated first in `positions: cache`), as if it had evicted the rest.
- sink_window -> plain: what the ring kept, in order, becomes a growable cache; keys the ring stored
  un-rotated are placed at consecutive positions 0..L-1 and decoding continues from position L (the
  ring's own numbering), keys rotated at absolute positions stay there.
- sink_window -> sink_window: the ring is re-windowed to the decode part's `sink_tokens` and `window`.

Positions after the hand-over: the decode part counts the prompt's tokens as seen (`tokens_seen`); a decode
part whose positions are absolute gets the position shift `tokens_seen - next_position`, where
`next_position` is what the prefill part's own scheme gives the next token (0 unless keys were renumbered:
a ring in `positions: cache`); StreamingLLM in `positions: cache` numbers positions inside its own cache.

actqkv and infiniretri own their whole pipeline and are refused as either part (`REFUSED`). On a model with
sliding-window layers a plain cache does not hold every prompt token in those layers, so a plain prefill
part cannot hand over to a StreamingLLM decode part there (`model_problem`, checked with the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

from kvmux.policies.base import PolicySession
from kvmux.policies.kv_buffer import GrowableCache, GrowableLayer
from kvmux.policies.rope import rotate

if TYPE_CHECKING:
    from kvmux.models.info import ModelInfo

PLAIN = "plain"
SINK_WINDOW = "sink_window"

CACHE_KIND: dict[str, str] = {
    "full": PLAIN,
    "flexprefill": PLAIN,
    "hip": PLAIN,
    "lazy_eviction": PLAIN,
    "streaming_llm": SINK_WINDOW,
}

# (policy, part) -> why it cannot be that part of a composed preset
REFUSED: dict[tuple[str, str], str] = {
    ("actqkv", "prefill"): "actqkv keeps the prompt in its own block memory (keys stored un-rotated at position 0, "
    "block representatives, activation statistics), which no other policy can decode from",
    ("actqkv", "decode"): "actqkv decodes from the block memory it builds while reading the prompt itself; it "
    "cannot start from another policy's cache",
    ("infiniretri", "prefill"): "infiniretri's prefill ends with a rebuilt prompt (instruction, retained sentences "
    "and question at new positions), not the request's prompt, so no hand-over is defined for it",
    ("infiniretri", "decode"): "infiniretri acts only while it reads the prompt (its decode is dense attention over "
    "the prompt it rebuilt), so after another policy's prefill there is nothing of it left to run; use full",
}


def pair_problem(prefill_policy: str, decode_policy: str) -> str | None:
    """Why a prefill policy's cache cannot become a decode policy's, or None when the pair is valid."""
    for part, name in (("prefill", prefill_policy), ("decode", decode_policy)):
        if (name, part) in REFUSED:
            return REFUSED[(name, part)]
        if name not in CACHE_KIND:
            return f"policy '{name}' declares no hand-over (composable policies: {', '.join(sorted(CACHE_KIND))})"
    return None


def model_problem(prefill_policy: str, decode_policy: str, info: ModelInfo) -> str | None:
    """Why the pair's hand-over cannot run on this model, or None: a plain cache that is cut to a StreamingLLM
    ring must hold every prompt token in every layer, which a model's sliding-window layers do not."""
    if CACHE_KIND.get(prefill_policy) != PLAIN or CACHE_KIND.get(decode_policy) != SINK_WINDOW:
        return None
    if all(isinstance(layer, GrowableLayer) for layer in GrowableCache(config=info.config).layers):
        return None
    return (
        "this model has sliding-window layers, which keep only their last tokens, so the prefill part's cache "
        "lacks the first tokens StreamingLLM keeps as sinks"
    )


def adopts_cache(prefill_policy: str, decode_policy: str) -> bool:
    """Whether the decode part takes over the prefill part's cache object as it is (no second copy)."""
    return CACHE_KIND.get(prefill_policy) == PLAIN and CACHE_KIND.get(decode_policy) == PLAIN


@dataclass
class KeptKV:
    """The K/V a prefill part leaves: per layer keys and values [B, Hkv, L, D] in token order."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    # per layer [L]: the rotary position of every key (a sliding-window layer holds only the last ones);
    # None: the keys are stored un-rotated
    rotated_at: list[torch.Tensor | None]
    next_position: int  # the position the prefill part's own scheme gives the next token
    cache: Cache | None = None  # a plain cache the decode part may adopt as it is


def export_kept(session: PolicySession) -> KeptKV:
    """What a prefill part's session holds once the prompt is read (its cache is left as it is)."""
    seen = session.tokens_seen
    layers = [(layer.keys, layer.values) for layer in session.cache.layers]
    device = layers[0][0].device
    if CACHE_KIND[session.policy.name] == PLAIN:  # every layer holds its last tokens (all of them, or a window)
        rotated_at = [torch.arange(seen - keys.shape[-2], seen, device=device) for keys, _ in layers]
        return KeptKV(layers, rotated_at, seen, cache=session.cache)
    length = layers[0][0].shape[-2]
    if session.params.positions == "cache":  # keys un-rotated; the ring numbers positions 0..length-1
        return KeptKV(layers, [None] * len(layers), length)
    sinks = min(session.params.sink_tokens, length)
    positions = torch.cat([torch.arange(sinks), torch.arange(seen - length + sinks, seen)]).to(device)
    return KeptKV(layers, [positions] * len(layers), seen)


def import_kept(session: PolicySession, kept: KeptKV) -> int:
    """Start a fresh decode part's session (its `tokens_seen` already set) from `kept`; returns the position
    shift its absolute positions need (see the module doc)."""
    if CACHE_KIND[session.policy.name] == PLAIN:
        return _into_plain(session, kept)
    return _into_sink_window(session, kept)


def _into_plain(session: PolicySession, kept: KeptKV) -> int:
    if kept.cache is not None:
        session.cache = kept.cache
    else:
        inv_freq = session.info.inv_freq
        for idx, ((keys, values), rotated_at) in enumerate(zip(kept.layers, kept.rotated_at, strict=True)):
            if rotated_at is None:  # un-rotated: at consecutive positions 0..L-1, as the ring numbered them
                keys = rotate(keys, torch.arange(keys.shape[-2], device=keys.device), inv_freq)
            session.cache.update(keys, values, idx)
    return session.tokens_seen - kept.next_position


def _into_sink_window(session: PolicySession, kept: KeptKV) -> int:
    params, inv_freq = session.params, session.info.inv_freq
    for idx, ((keys, values), rotated_at) in enumerate(zip(kept.layers, kept.rotated_at, strict=True)):
        length = keys.shape[-2]
        sinks = min(params.sink_tokens, length)
        index = torch.cat([torch.arange(sinks), torch.arange(max(sinks, length - params.window), length)])
        index = index.to(keys.device)
        keys, values = keys.index_select(-2, index), values.index_select(-2, index)
        if params.positions == "cache" and rotated_at is not None:  # the ring stores keys un-rotated
            keys = rotate(keys, -rotated_at[index], inv_freq)
        elif params.positions == "original" and rotated_at is None:  # at their places 0..L-1 (next: L)
            keys = rotate(keys, index, inv_freq)
        session.cache.layers[idx].load(keys, values)
    return 0 if params.positions == "cache" else session.tokens_seen - kept.next_position
