"""InfLLM-style context memory of one layer, as ActQKV uses it (arXiv 2502.13542; InfLLM, arXiv 2402.04617).

Per layer and request the memory holds every token seen, in three parts:
- `init`: the first `n_init` tokens (attention sinks), filled as they leave the local window;
- `blocks`: older tokens in blocks of `block_size`, each with a representative vector: per query
  head, the mean of the `repr_topk` keys of the block that received the most local attention
  while they were in the local window, concatenated over heads ([Hq*D]);
- `recent`: everything after the last block (the local window plus fewer than `block_size` tokens
  on their way to the next block), with the local attention each key has received so far.
Keys are stored without RoPE (the model runs at position 0, see `policy.py`).

`ActivationStats` keeps the running per-channel statistics of the probe inputs (the window
queries, flattened over heads) and turns a window into Activation-Bias weights.

The memory is a transformers cache layer so that it can be the session's cache: `update` passes the
current keys and values through unchanged (the session appends them window by window inside the
attention call), and `get_mask_sizes` reports only the current tokens, so the model never builds a
mask over the whole memory.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin


class ActivationStats:
    """Running per-channel mean/variance over windows, and Activation-Bias weights of a window.

    Every window counts as one unit (a decoded token as much as a 256-query window, as in the
    reference); the unit count is capped at `horizon`, so older windows fade once it is reached.
    """

    def __init__(self, warmup: int, horizon: int):
        self.warmup = warmup
        self.horizon = horizon
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def update(self, h: torch.Tensor) -> None:
        """Fold one window h [w, C] (fp32) into the statistics."""
        mean_w = h.mean(dim=0)
        var_w = h.var(dim=0, unbiased=False)
        if self.mean is None or self.var is None:
            self.mean, self.var = mean_w, var_w
        else:
            c = float(min(self.count, self.horizon))
            delta = mean_w - self.mean
            self.var = (c * self.var + var_w + c / (c + 1.0) * delta.square()) / (c + 1.0)
            self.mean = self.mean + delta / (c + 1.0)
        self.count += 1

    def bias(self, h: torch.Tensor) -> torch.Tensor:
        """Activation Bias per token [w]: mean over channels of (h - mu)^2 / (var + mean(var)/100)."""
        assert self.mean is not None and self.var is not None
        denom = self.var + self.var.mean() / 100.0 + 1e-12
        return ((h - self.mean).square() / denom).mean(dim=-1)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Update with window h [w, C] and return its probe weights [w] (uniform during warm-up)."""
        self.update(h)
        uniform = torch.full((h.shape[0],), 1.0 / h.shape[0], device=h.device)
        if self.count <= self.warmup:
            return uniform
        bias = self.bias(h)
        total = bias.sum()
        return bias / total if total > 0 else uniform


def top_attended_mean(keys: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per head, the mean of the `k` keys with the highest score: keys [H, n, D], scores [H, n] -> [H, D]."""
    k = min(k, keys.shape[1])
    idx = scores.topk(k, dim=-1).indices
    picked = torch.gather(keys, 1, idx[..., None].expand(-1, -1, keys.shape[-1]))
    return picked.float().mean(dim=1)


class ContextMemory(CacheLayerMixin):
    """All the KV of one layer of one request, split into init / blocks / recent."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        n_init: int,
        n_local: int,
        block_size: int,
        repr_topk: int,
        num_heads: int,
        stats: ActivationStats,
        offload: bool = False,
    ):
        super().__init__()
        self.n_init, self.n_local, self.block_size, self.repr_topk = n_init, n_local, block_size, repr_topk
        self.num_heads = num_heads
        self.stats = stats
        self.offload_blocks = offload
        self.question: torch.Tensor | None = None  # [Hq*D] fp32, set from kv_policy.query
        self.num_blocks = 0

    # -- transformers cache-layer protocol -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        _, kv_heads, _, dim = key_states.shape
        self.kv_heads, self.head_dim = kv_heads, dim
        empty = key_states.new_zeros((kv_heads, 0, dim))
        self.init_k, self.init_v = empty, empty.clone()
        self.rec_k, self.rec_v = empty.clone(), empty.clone()
        self.rec_score = torch.zeros((self.num_heads, 0), device=self.device)
        self.store_device = torch.device("cpu") if self.offload_blocks else self.device
        self.blk_k = torch.zeros((kv_heads, 0, self.block_size, dim), dtype=self.dtype, device=self.store_device)
        self.blk_v = self.blk_k.clone()
        self.reprs = torch.zeros((0, self.num_heads * dim), device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.tokens_held if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.num_blocks = 0
        self.question = None

    # -- layout ---------------------------------------------------------------------------------
    @property
    def recent_len(self) -> int:
        return self.rec_k.shape[1]

    @property
    def recent_start(self) -> int:
        """Absolute index of the first recent token."""
        return self.init_k.shape[1] + self.num_blocks * self.block_size

    @property
    def tokens_held(self) -> int:
        return self.recent_start + self.recent_len

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        n = self.num_blocks
        tensors = [self.init_k, self.init_v, self.rec_k, self.rec_v, self.blk_k[:, :n], self.blk_v[:, :n]]
        kv = sum(t.numel() * t.element_size() for t in tensors)
        return kv + self.reprs[:n].numel() * self.reprs.element_size() + self.rec_score.numel() * 4

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add a window's un-rotated keys/values [Hkv, w, D] to the recent buffer."""
        self.rec_k = torch.cat([self.rec_k, key], dim=1)
        self.rec_v = torch.cat([self.rec_v, value], dim=1)
        zeros = torch.zeros((self.num_heads, key.shape[1]), device=self.device)
        self.rec_score = torch.cat([self.rec_score, zeros], dim=1)

    def add_local_scores(self, scores: torch.Tensor) -> None:
        """Add attention received [Hq, n] by the last n recent keys."""
        n = scores.shape[1]
        self.rec_score[:, self.recent_len - n :] += scores

    def advance(self) -> None:
        """Move tokens that left the local window into init, then into full blocks."""
        room = self.n_init - self.init_k.shape[1]
        if room > 0 and self.recent_len > self.n_local:
            take = min(room, self.recent_len - self.n_local)
            self.init_k = torch.cat([self.init_k, self.rec_k[:, :take]], dim=1)
            self.init_v = torch.cat([self.init_v, self.rec_v[:, :take]], dim=1)
            self._drop_recent(take)
        bs = self.block_size
        while self.recent_len - bs >= self.n_local:
            self._push_block(self.rec_k[:, :bs], self.rec_v[:, :bs], self.rec_score[:, :bs])
            self._drop_recent(bs)

    def _drop_recent(self, n: int) -> None:
        self.rec_k, self.rec_v, self.rec_score = self.rec_k[:, n:], self.rec_v[:, n:], self.rec_score[:, n:]

    def _push_block(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        n = self.num_blocks
        if n == self.blk_k.shape[1]:  # grow by doubling
            grow = max(16, n)
            pad = keys.new_zeros((self.kv_heads, grow, self.block_size, self.head_dim), device=self.store_device)
            self.blk_k = torch.cat([self.blk_k, pad], dim=1)
            self.blk_v = torch.cat([self.blk_v, pad.clone()], dim=1)
            self.reprs = torch.cat([self.reprs, self.reprs.new_zeros((grow, self.reprs.shape[1]))], dim=0)
        self.blk_k[:, n] = keys.to(self.store_device)
        self.blk_v[:, n] = values.to(self.store_device)
        self.reprs[n] = self.representative(keys, scores)
        self.num_blocks += 1

    def representative(self, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[Hq*D]: per query head, mean of the repr_topk most locally attended keys of the block."""
        groups = self.num_heads // keys.shape[0]
        expanded = keys.repeat_interleave(groups, dim=0)  # query-head order
        return top_attended_mean(expanded, scores, self.repr_topk).reshape(-1)

    def gather_blocks(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the chosen blocks (sorted, distinct), concatenated: [Hkv, len(idx)*bs, D] on the
        compute device. Every block chosen (a retrieval layer, a short prompt): views, no copy."""
        n = self.num_blocks
        if idx.numel() == n:
            keys = self.blk_k[:, :n].reshape(self.kv_heads, -1, self.head_dim)
            values = self.blk_v[:, :n].reshape(self.kv_heads, -1, self.head_dim)
        else:
            idx = idx.to(self.store_device)
            keys = self.blk_k.index_select(1, idx).reshape(self.kv_heads, -1, self.head_dim)
            values = self.blk_v.index_select(1, idx).reshape(self.kv_heads, -1, self.head_dim)
        return keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)

    def block_scores(self, probe: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [N] between a probe [Hq*D] and every block representative."""
        reprs = torch.nn.functional.normalize(self.reprs[: self.num_blocks], dim=-1)
        return reprs @ torch.nn.functional.normalize(probe, dim=-1)
