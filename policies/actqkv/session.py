"""One request under ActQKV (arXiv 2502.13542): windowed local + retrieved attention over the
request's context memory, per layer. The algorithm, the position schemes and the deviations from
the reference are in `policy.py`; the memory layout in `context_memory.py`.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from kvmux.policies.actqkv.block_budget import BlockBudget
from kvmux.policies.actqkv.context_memory import ActivationStats, ContextMemory
from kvmux.policies.actqkv.grouped_attention import merged_attention
from kvmux.policies.actqkv.params import ActQKVParams
from kvmux.policies.actqkv.question import question_attention, question_ids
from kvmux.policies.base import AttentionCall, KVStats, PolicyInputError, PolicySession
from kvmux.policies.retrieval_heads import retrieval_layer_set
from kvmux.policies.rope import rotate


class ActQKVSession(PolicySession):
    params: ActQKVParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        dense = retrieval_layer_set(self.info, p.retrieval_layers, "actqkv")
        self.budget = BlockBudget(self.info.num_layers, p.topk, p.min_blocks, p.entropy_history, dense)
        self.inv_freq = self.info.inv_freq.to(self.info.device)
        self.capturing = False
        self.prefilling = False  # the prompt is being read (question term, no entropy split), whatever the chunk size
        num_layers = self.info.num_layers
        self.attended = [0] * num_layers  # (query, key) pairs computed, per layer
        self.queries = [0] * num_layers
        self.max_attended = 0  # most keys any one query attended
        self.question_source = "none"  # where the question vector came from (`question.question_ids`)
        self.question_tokens = 0

    def make_cache(self) -> Cache:
        p = self.params
        layers = [
            ContextMemory(
                p.n_init,
                p.n_local,
                p.block_size,
                p.repr_topk,
                self.info.num_heads,
                ActivationStats(p.stats_warmup, p.stats_horizon),
                offload=p.offload,
            )
            for _ in range(self.info.num_layers)
        ]
        return Cache(layers=layers)

    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        # position 0 everywhere: q and k arrive un-rotated and are rotated here (see policy.py)
        return torch.zeros((1, num_tokens), dtype=torch.long, device=self.info.device)

    def prefill_chunk_tokens(self, runner) -> int:
        w = self.params.window
        return max(w, runner.prefill_chunk_tokens // w * w)

    # -- question vector ------------------------------------------------------------------------
    def prefill(self, runner, input_ids):
        found = question_ids(self.params, self.request, self.info.tokenizer, input_ids[0].tolist())
        if found is not None:
            ids, self.question_source = found
            self.encode_question(runner, torch.tensor([ids], device=self.info.device))
            self.question_tokens = len(ids)
            yield
        self.prefilling = True
        try:
            return (yield from super().prefill(runner, input_ids))
        finally:
            self.prefilling = False

    def encode_question(self, runner, question_ids: torch.Tensor) -> None:
        """Run the question alone and store each layer's question vector; nothing enters the memory."""
        self.capturing, self.counts_tokens = True, False  # the question is not part of the request's tokens
        try:
            runner.forward(self, question_ids)
        finally:
            self.capturing, self.counts_tokens = False, True

    def _question_attention(
        self, mem: ContextMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling, piece_rows: int = 0
    ):
        """The question's attention over itself (see `question.py`); stores the layer's question vector."""
        p = self.params
        out, mem.question = question_attention(q, k, v, scaling, self.inv_freq, p.n_local, p.repr_topk, piece_rows)
        return out

    # -- attention ------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        if call.query.shape[0] != 1:
            raise PolicyInputError("actqkv serves one sequence per forward (batch size 1)")
        q, k, v = call.query[0], call.key[0], call.value[0]
        mem = self.cache.layers[call.layer_idx]
        assert isinstance(mem, ContextMemory) and k.shape[1] == q.shape[1], "expects the pass-through cache"
        if self.capturing:
            out = self._question_attention(mem, q, k, v, call.scaling)
        else:
            w, t = self.params.window, q.shape[1]
            decoding = not self.prefilling  # by phase: a prompt's last chunk may be one token long
            if call.layer_idx == 0:
                self.budget.start_forward(math.ceil(t / w))
            outs = [
                self._window(mem, call, i // w, (q[:, i : i + w], k[:, i : i + w], v[:, i : i + w]), decoding)
                for i in range(0, t, w)
            ]
            out = torch.cat(outs, dim=1)
        return out.to(call.query.dtype).transpose(0, 1).unsqueeze(0).contiguous()

    def _select(self, mem: ContextMemory, layer: int, window_idx: int, probe_q: torch.Tensor, decoding: bool):
        """Indices (sorted) of the blocks this window attends; updates the activation statistics. A retrieval
        layer (`retrieval_layers`) attends every block: no probe, no scores, nothing drawn from the pool."""
        if layer in self.budget.dense:
            self.budget.last[layer] = mem.num_blocks
            return torch.arange(mem.num_blocks, device=probe_q.device) if mem.num_blocks else None
        h = probe_q.float().transpose(0, 1).reshape(probe_q.shape[1], -1)  # [w, Hq*D]
        weights = mem.stats.weights(h)
        if mem.num_blocks == 0:
            self.budget.last[layer] = 0
            return None
        scores = mem.block_scores(weights @ h)
        if not decoding and mem.question is not None:
            scores = scores + self.params.question_weight * mem.block_scores(mem.question)
        k = self.budget.take(layer, window_idx, scores, entropy_split=decoding)
        return scores.topk(k).indices.sort().values

    def _window(self, mem: ContextMemory, call: AttentionCall, window_idx: int, qkv, decoding: bool) -> torch.Tensor:
        """Attention output [Hq, w, D] of one window of queries; then the memory advances."""
        (q, k, v), layer = qkv, call.layer_idx
        p, rot, dev = self.params, self.inv_freq, q.device
        mem.append(k, v)
        w, r = q.shape[1], mem.recent_len
        rotated = p.positions != "inf_llm"  # global keys carry positions of their own
        probe_q = rotate(q, torch.full((w,), p.n_local, device=dev), rot)
        chosen = self._select(mem, layer, window_idx, probe_q, decoding)
        n_chosen = 0 if chosen is None else chosen.numel() * p.block_size
        n_init = mem.init_k.shape[1]
        # local part: the last n_local + w - 1 recent tokens, relative (or absolute) positions
        n_loc = min(r, p.n_local + w - 1)
        slots = torch.arange(n_loc, device=dev)
        if p.positions == "absolute":
            recent_base = mem.recent_start
        elif p.positions == "ordered":  # init, chosen blocks, recent tokens: consecutive slots
            recent_base = n_init + n_chosen
        else:
            recent_base = 0
        base = recent_base + r - n_loc if rotated else 0
        q_loc = rotate(q, base + slots[n_loc - w :], rot)
        k_loc = rotate(mem.rec_k[:, r - n_loc :], base + slots, rot)
        dist = slots[n_loc - w :, None] - slots[None, :]
        masks = [(dist >= 0) & (dist < p.n_local)]
        keys, values = [k_loc], [mem.rec_v[:, r - n_loc :]]
        # global part: retrieved blocks, init tokens, recent tokens older than each query's window
        g_keys, g_values, g_pos = [], [], []
        if chosen is not None and chosen.numel():
            bk, bv = mem.gather_blocks(chosen)
            g_keys.append(bk)
            g_values.append(bv)
            if p.positions == "ordered":
                g_pos.append(n_init + torch.arange(n_chosen, device=dev))
            elif rotated:
                offs = torch.arange(p.block_size, device=dev)
                g_pos.append((n_init + chosen.to(dev)[:, None] * p.block_size + offs).reshape(-1))
        n_rem = max(0, r - p.n_local)
        for part_k, part_v, begin in (
            (mem.init_k, mem.init_v, 0),
            (mem.rec_k[:, :n_rem], mem.rec_v[:, :n_rem], recent_base),
        ):
            if part_k.shape[1]:
                g_keys.append(part_k)
                g_values.append(part_v)
                if rotated:  # under inf_llm every global key stays at position 0
                    g_pos.append(begin + torch.arange(part_k.shape[1], device=dev))
        if g_keys:
            gk = torch.cat(g_keys, dim=1)
            if rotated:
                gk = rotate(gk, torch.cat(g_pos), rot)
            keys.append(gk)
            values.append(torch.cat(g_values, dim=1))
            n_fixed = gk.shape[1] - n_rem
            q_dist = (r - w + torch.arange(w, device=dev))[:, None] - torch.arange(n_rem, device=dev)[None, :]
            fixed = torch.ones(w, n_fixed, dtype=torch.bool, device=dev)
            masks.append(torch.cat([fixed, q_dist >= p.n_local], dim=1))
        q_glob = q_loc if rotated else probe_q
        out, local_received = merged_attention((q_loc, q_glob), keys, values, masks, call.scaling)
        mem.add_local_scores(local_received)
        self._count(layer, masks)
        mem.advance()
        return out

    def _count(self, layer: int, masks: list[torch.Tensor]) -> None:
        per_query = sum(m.sum(dim=1) for m in masks)
        self.attended[layer] += int(per_query.sum())
        self.queries[layer] += per_query.shape[0]
        self.max_attended = max(self.max_attended, int(per_query.max()))

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> KVStats:
        p = self.params
        layers = [m for m in self.cache.layers if isinstance(m, ContextMemory) and m.is_initialized]
        queries = sum(self.queries)
        return KVStats(
            tokens_seen=self.tokens_seen,
            tokens_kept=max((m.tokens_held for m in layers), default=0),
            kv_bytes_kept=sum(m.nbytes() for m in layers),
            kv_bytes_full=self.info.kv_bytes_per_token * self.tokens_seen,
            extra={
                "positions": p.positions,
                "question": self.question_source,
                "question_tokens": self.question_tokens,
                "blocks": max((m.num_blocks for m in layers), default=0),
                "kv_budget_tokens": p.n_init + p.n_local + p.topk * p.block_size,
                "attended_keys_mean": round(sum(self.attended) / queries, 1) if queries else 0.0,
                "attended_keys_max": self.max_attended,
                "blocks_last_step": list(self.budget.last),
            },
        )
