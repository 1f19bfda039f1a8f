"""ActQKV's dynamic cut-off (arXiv 2502.13542, step 5 of the algorithm in `policy.py`).

A pool of `topk * layers` blocks per window of queries is shared by the layers in order. Layer l
takes K_l = clip(round(w_l * pool_left), min(N, min_blocks), min(N, 2*topk)), where w_l = 1/(L-l)
(equal split) or, once every layer has a full history of entropy samples and the split is
entropy-driven (decoding), w_l = H_l / sum_{m>=l} H_m with H the mean normalised entropy of
softmax(block scores) of each layer's last samples. A layer with fewer than 2 blocks takes them
all without recording a sample or drawing from the pool. Layers outside the pool (`dense`: the
retrieval layers that attend every block; the session never asks for them) neither draw from it nor
take part in the split; the pool is `topk` times the other layers.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class BlockBudget:
    """The per-window pool of `topk * layers` blocks shared by the layers in order (entropy-driven)."""

    def __init__(self, num_layers: int, topk: int, min_blocks: int, history: int, dense: frozenset[int] = frozenset()):
        self.num_layers, self.topk, self.min_blocks = num_layers, topk, min_blocks
        self.dense = dense
        self.pooled = [layer for layer in range(num_layers) if layer not in dense]
        self.pool_size = float(topk * len(self.pooled))
        self.cap = 2 * topk
        self.history: list[deque[float]] = [deque(maxlen=history) for _ in range(num_layers)]
        self.pools: list[float] = []
        self.last: list[int] = [0] * num_layers

    def start_forward(self, num_windows: int) -> None:
        self.pools = [self.pool_size] * num_windows

    def weight(self, layer: int, entropy_split: bool) -> float:
        later = [m for m in self.pooled if m >= layer]  # this layer and the pooled ones after it
        full = all(len(self.history[m]) == self.history[m].maxlen for m in self.pooled)
        if entropy_split and full:
            means = {m: sum(self.history[m]) / len(self.history[m]) for m in later}
            rest = sum(means.values())
            if rest > 0:
                return means[layer] / rest
        return 1.0 / len(later)

    def take(self, layer: int, window_idx: int, scores: torch.Tensor, entropy_split: bool) -> int:
        """Blocks for `layer` in window `window_idx` given its block scores [N]."""
        n = scores.shape[0]
        if n < 2:
            self.last[layer] = n
            return n
        p = torch.softmax(scores.float(), dim=0)
        entropy = -(p * torch.log(p + 1e-10)).sum().item() / math.log(n)
        self.history[layer].append(entropy)
        left = self.pools[window_idx]
        k = round(self.weight(layer, entropy_split) * left)
        k = max(min(k, min(n, self.cap)), min(n, self.min_blocks))
        self.pools[window_idx] = left - k
        self.last[layer] = k
        return k
