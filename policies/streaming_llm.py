"""StreamingLLM: attention sinks + a rolling window of recent tokens.

Efficient Streaming Language Models with Attention Sinks, Xiao et al., ICLR 2024,
https://arxiv.org/abs/2309.17453 (reference: mit-han-lab/streaming-llm, `kv_cache.py`,
`pos_shift/modify_llama.py`).

Algorithm: keep the KV of the first `sink_tokens` tokens and of the last `window` tokens in
every layer and head; drop everything in between, between forwards. The cache is constant in
size, so generation can run indefinitely.

Positions (`positions`):
- `cache` (default, the paper's scheme): positions are assigned inside the cache. Keys are
  stored un-rotated and re-rotated to their slot index 0..L-1 for every prefill forward; the
  query sits at slot L. A decode step gets the same distances from a per-layer copy of the
  keys that is rotated once per key (`streaming_decode.py`). Relative distances never exceed
  the cache size, so the model runs far past its trained context (StreamingLLM's central
  result). Default because it is what the paper measures and the only mode that streams past
  the model's context.
- `original`: keys keep the absolute positions they were rotated with (kvpress,
  KVCache-Factory, LazyEviction's baseline). Cheaper (no re-rotation) but diverges once the
  absolute position passes the trained context.

Storage: sinks and window live in one buffer whose window part is a ring while decoding
(`sink_window_cache.py`), so a decode step copies nothing; it holds exactly the keys above.

Deviations from the reference:
- The reference stores un-rotated keys by patching the attention forward; we receive rotated
  keys from the stock model and un-rotate them once with the model's own inverse frequencies
  (fp32), which keeps any RoPE scaling factor inside the stored key.
- Prompts are prefilled in chunks of `prefill_chunk` tokens (256, at most `window`); the reference
  prefills a chat turn in one forward. Before each chunk of n tokens the cache is cut to the sinks
  + the last `window - n` tokens, so that with the chunk it holds at most `sink_tokens + window`
  keys (the reference's `evict_for_space`): positions in cache mode stay below `sink_tokens +
  window`, as in the reference, and a token inside a chunk sees at most that many keys. After the
  chunk the cache is cut to the sinks + the last `window` again, so a state between chunks is
  sinks + window whatever the chunk size: the chunk boundaries are where a cached prefix can be
  resumed exactly (the prefix cache stores the state at a chunk boundary). A decode step adds its
  token to sinks + window (at slot `sink_tokens + window`), then the oldest window token goes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers.cache_utils import Cache

from kvmux.policies.base import FP32_BYTES, AttentionCall, Policy, PolicyParams, PolicySession, dense_step_bytes
from kvmux.policies.dense import sdpa
from kvmux.policies.prefix import PrefixReuse, PrefixState
from kvmux.policies.registry import register
from kvmux.policies.rope import cos_sin, rotate_with
from kvmux.policies.sink_window_cache import SinkWindowLayer
from kvmux.policies.streaming_decode import RotatedKeys


class StreamingLLMParams(PolicyParams):
    sink_tokens: int = Field(4, ge=0, le=256, description="initial tokens always kept (paper: 4; at most 256)")
    window: int = Field(1020, ge=1, le=131072, description="most recent tokens kept (paper: 1020; at most 131072)")
    positions: Literal["cache", "original"] = Field(
        "cache", description="'cache': re-rotate keys to cache slots (paper); 'original': absolute"
    )
    prefill_chunk: int = Field(
        256, ge=1, le=131072, description="prompt tokens per forward, evicting between forwards (at most window)"
    )


class StreamingLLMSession(PolicySession):
    params: StreamingLLMParams
    _tables: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None  # slot cos/sin of the current slots
    _rotated: RotatedKeys | None = None  # cache mode: the decode steps' rotated keys

    @property
    def cache_mode(self) -> bool:
        return self.params.positions == "cache"

    def make_cache(self) -> Cache:
        inv_freq = self.info.inv_freq.to(self.info.device) if self.cache_mode else None
        sinks, window = self.params.sink_tokens, self.params.window
        return Cache(layers=[SinkWindowLayer(sinks, window, inv_freq) for _ in range(self.info.num_layers)])

    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        if not self.cache_mode:
            return super().next_position_ids(num_tokens)
        start = self.cache.get_seq_length()
        return torch.arange(start, start + num_tokens, device=self.info.device).unsqueeze(0)

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if not self.cache_mode:
            return super().attention(call)
        layer = self.cache.layers[call.layer_idx]
        if call.query.shape[2] == 1 and call.mask is None:
            if self._rotated is None:
                self._rotated = RotatedKeys(self.info.inv_freq.to(call.key.device))
            query, keys = self._rotated.decode_inputs(layer, call.layer_idx, call.query, call.key, self.tokens_seen)
            return sdpa(query, keys, call.value, None, call.scaling)
        keys = rotate_with(call.key, *self._slot_tables(layer, call.key.device))
        return sdpa(call.query, keys, call.value, call.mask, call.scaling)

    def _slot_tables(self, layer: SinkWindowLayer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every physical slot's logical slot, computed once per forward and shared by every
        layer (all layers hold the same slots)."""
        key = (layer.state.length, layer.state.oldest)
        if self._tables is None or self._tables[0] != key:
            slots = layer.slot_positions(device)
            self._tables = (key, *cos_sin(slots, self.info.inv_freq.to(device)))
        return self._tables[1], self._tables[2]

    def after_forward(self, num_tokens: int) -> None:
        for layer in self.cache.layers:
            layer.evict()

    def checkpoint(self) -> list:
        return [layer.snapshot() for layer in self.cache.layers]

    def restore(self, checkpoint: list) -> None:
        for layer, snapshot in zip(self.cache.layers, checkpoint, strict=True):
            layer.restore(snapshot)

    def prefill_chunk_tokens(self, runner) -> int:
        return prefill_chunk(self.params, runner.prefill_chunk_tokens)

    def prefill(self, runner, input_ids):
        """Chunks of `prefill_chunk_tokens`; before each one the cache makes room for it, so that with the
        chunk it holds at most sinks + window tokens (see the module doc)."""
        chunk, window = self.prefill_chunk_tokens(runner), self.params.window
        logits = None
        for start in range(0, input_ids.shape[1], chunk):
            piece = input_ids[:, start : start + chunk]
            with torch.inference_mode():  # the buffers are the runner's inference tensors
                for layer in self.cache.layers:
                    layer.evict(window - piece.shape[1])
            logits = runner.forward(self, piece)
            yield
        assert logits is not None, "empty prompt"
        return logits[0, -1]

    def export_prefix(self, length: int) -> PrefixState:
        if length != self.tokens_seen:
            raise ValueError("a streaming_llm state serves exactly the tokens it has seen")
        return PrefixState(length, [(layer.keys.clone(), layer.values.clone()) for layer in self.cache.layers])

    def import_prefix(self, state: PrefixState, length: int) -> None:
        if length != state.length:
            raise ValueError("a streaming_llm state serves exactly the tokens it has seen")
        for layer, (keys, values) in zip(self.cache.layers, state.layers, strict=True):
            layer.load(keys, values)
        self.tokens_seen = length

    def stats(self):
        stats = super().stats()
        stats.extra["positions"] = self.params.positions
        return stats


@register
class StreamingLLMPolicy(Policy):
    name = "streaming_llm"
    paper = "2309.17453"
    Params = StreamingLLMParams
    session_class = StreamingLLMSession
    batched_decode = True
    summary = "attention sinks + recent window, evicted between forwards"

    def prefix_reuse(self, params, info, chunk: int) -> PrefixReuse:
        # sinks + window after a prefix, exact at prefill-chunk boundaries (where a fresh prefill evicts
        # too); the state cannot be cut shorter
        return PrefixReuse(granularity=prefill_chunk(params, chunk), truncatable=False)

    def kv_bytes_needed(self, params, info, num_tokens: int) -> int:
        # the cache never holds more than sinks + window (+ a decode step's token before eviction); in cache
        # mode the decode steps keep a rotated copy of the keys (half of each token's K/V bytes)
        held = min(num_tokens, params.sink_tokens + params.window + 1)
        copies = 1.5 if params.positions == "cache" else 1.0
        return int(info.kv_bytes_per_token * held * copies)

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        # chunks of at most `window` tokens over at most sinks + window keys (+ 1 in a decode step); in cache
        # mode every layer re-rotates its keys (the rotated copy and its two products, fp32)
        queries = max(1, min(prefill_chunk(params, chunk), num_tokens))
        keys = min(num_tokens, params.sink_tokens + params.window + 1)
        rotated = 3 * info.num_kv_heads * keys * info.head_dim * FP32_BYTES if params.positions == "cache" else 0
        return dense_step_bytes(queries, keys) + rotated

    def context_limit(self, params, info):
        # in cache mode positions never exceed the cache, so any prompt length streams through
        return None if params.positions == "cache" else info.max_context


def prefill_chunk(params: StreamingLLMParams, chunk: int) -> int:
    """Tokens per prefill forward: at most the window, so a forward never evicts its own queries' keys."""
    return max(1, min(chunk, params.window, params.prefill_chunk))
