"""The eval path of the shared-context tasks (`scb_kv`, `scb_multiturn`): each context's turns in order,
for every policy variant and prefix-cache mode.

A cell is (variant, task, length, cache mode); its samples are contexts, each with one record per turn:
the answer and its score, the prompt tokens, the prompt tokens served by the prefix cache
(`cached_tokens`) and the time to first token (`ttft_ms`: the in-process engine's prefill time,
`kv.prefill_ms`; over HTTP, from sending the request to the first streamed token). Cache mode `on` lets
the prefix cache serve turns 2.. (the in-process engine's cache is emptied before each context, so turn 1
starts cold); `off` sends `kv_policy.cache: false` with every turn. Before a variant's first context at
a length, one unrecorded warm-up request (that context's first turn, cache off, one token) takes the
one-time costs (kernel compilation, first allocations) out of turn 1's time. A context is stored once all
its turns are in, so an interrupted run resumes at the first unfinished context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kvmux.evals.quality.backends import Generation, Rejected, without_prefix_cache
from kvmux.evals.quality.results import ResultStore, cell_key
from kvmux.evals.quality.scoring import score
from kvmux.evals.quality.turns_report import summarize_turns
from kvmux.evals.tasks.common import Renderer
from kvmux.evals.tasks.shared_context import CACHE_MODES, SharedContextSample, SharedContextTask, TurnPrompt

if TYPE_CHECKING:
    from kvmux.evals.quality.config import EvalConfig, Variant

CACHE_FLAG_CHOICES = (*CACHE_MODES, "both")


def cache_modes(flag: str) -> list[str]:
    """`--prefix-cache`: on, off, or both (on first)."""
    if flag == "both":
        return list(CACHE_MODES)
    if flag not in CACHE_MODES:
        raise ValueError(f"prefix cache mode must be one of {CACHE_FLAG_CHOICES}, got {flag!r}")
    return [flag]


def turn_cell_key(label: str, task: str, length: int, cache: str, turns: int) -> str:
    return f"{cell_key(label, task, length, None)}|cache={cache}|turns={turns}"


def turn_record(turn: int, prompt: TurnPrompt, out: Generation, metric: str) -> dict[str, Any]:
    """What one turn stores: the answer and its score, token counts, cache use and time to first token."""
    value = score(metric, out.text, list(prompt.answers))
    return {
        "turn": turn + 1,
        "question": prompt.query,
        "answers": list(prompt.answers),
        "prediction": out.text,
        "score": value,
        "correct": value >= 100.0,
        "prompt_tokens": out.prompt_tokens,
        "cached_tokens": out.cached_tokens,
        "ttft_ms": out.ttft_ms,
        "completion_tokens": out.completion_tokens,
        "completion_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "seconds": round(out.seconds, 3),
        "kv": out.kv,
    }


class TurnRunner:
    """Runs the shared-context cells of one task and length for every variant and cache mode."""

    def __init__(
        self,
        config: EvalConfig,
        backend: Any,
        store: ResultStore,
        renderer: Renderer,
        policy_name: Callable[[Variant], str],
        limit_message: Callable[[Variant, int], str | None],
    ):
        self.config = config
        self.backend = backend
        self.store = store
        self.renderer = renderer
        self.policy_name = policy_name
        self.limit_message = limit_message
        self._warmed: set[tuple[str, int]] = set()  # (variant label, length)

    def _cell(self, variant: Variant, task: SharedContextTask, length: int, mode: str) -> dict[str, Any]:
        return self.store.cell(
            turn_cell_key(variant.label, task.name, length, mode, self.config.turns),
            label=variant.label,
            preset=variant.preset,
            overrides=variant.overrides,
            policy=self.policy_name(variant),
            task=task.name,
            metric=task.metric,
            length=length,
            depth=None,
            cache=mode,
            turns=self.config.turns,
            kind="turns",
        )

    def _finish(self, cell: dict[str, Any], status: str, message: str | None = None) -> None:
        cell["status"], cell["message"] = status, message
        cell["summary"] = summarize_turns(cell)
        self.store.save()

    def run(self, task: SharedContextTask, length: int, bar: tqdm) -> None:
        cfg = self.config
        pairs = [(v, mode) for v in cfg.variants for mode in cfg.cache_modes]
        cells = {(v.label, mode): self._cell(v, task, length, mode) for v, mode in pairs}
        for cell in cells.values():  # a larger --samples reopens finished cells; their contexts stay
            if cell["status"] == "done" and len(cell["samples"]) < cfg.samples:
                cell["status"] = "partial"
        for index in range(cfg.samples):
            todo = [
                (v, mode)
                for v, mode in pairs
                if cells[v.label, mode]["status"] == "partial"
                and index not in {s["index"] for s in cells[v.label, mode]["samples"]}
            ]
            if not todo:
                bar.update(len(cfg.variants))
                continue
            bar.set_postfix_str(f"{task.name} {length} context {index}")
            try:
                sample = task.make(self.renderer, length, None, index, cfg.seed, cfg.max_new_tokens or 0, cfg.turns)
            except ValueError as exc:  # too short a length (TaskLengthError), or no chat template
                for v, mode in todo:
                    self._finish(cells[v.label, mode], "rejected", f"{task.name} at length {length}: {exc}")
                bar.update(len(cfg.variants) * (cfg.samples - index))
                return
            for variant in cfg.variants:
                for mode in cfg.cache_modes:
                    if (variant, mode) in todo:
                        self._run_context(variant, mode, cells[variant.label, mode], sample)
                bar.update(1)
        for cell in cells.values():
            if cell["status"] == "partial":
                self._finish(cell, "done")

    def _run_context(self, variant: Variant, mode: str, cell: dict[str, Any], sample: SharedContextSample) -> None:
        message = self.limit_message(variant, sample.max_prompt_tokens + sample.max_new_tokens)
        if message is not None:
            self._finish(cell, "rejected", message)
            return
        self._warm_up(variant, sample)
        if mode == "on":
            self.backend.clear_prefix_cache()
        answers: list[str] = []
        records: list[dict[str, Any]] = []
        for k in range(len(sample.turns)):
            prompt = sample.turn_prompt(k, answers)
            kv_policy = variant.kv_policy(prompt.query if self.config.send_query else None)
            if mode == "off":
                kv_policy = without_prefix_cache(kv_policy)
            try:
                out = self.backend.generate_turn(prompt, kv_policy)
            except Rejected as exc:
                self._finish(cell, "rejected", f"turn {k + 1}: {exc.message}")
                return
            answers.append(out.text)
            records.append(turn_record(k, prompt, out, sample.metric))
        cell["samples"].append(
            {
                "index": sample.index,
                "context_sha256": sample.context_sha256,
                "context_tokens": sample.context_tokens,
                "turns": records,
            }
        )
        cell["summary"] = summarize_turns(cell)
        self.store.save()

    def _warm_up(self, variant: Variant, sample: SharedContextSample) -> None:
        """The first turn once, unrecorded and without the cache, at a variant's first context of a length."""
        if (variant.label, sample.length) in self._warmed:
            return
        self._warmed.add((variant.label, sample.length))
        prompt = replace(sample.turn_prompt(0, []), max_new_tokens=1)
        kv_policy = variant.kv_policy(prompt.query if self.config.send_query else None)
        try:
            self.backend.generate_turn(prompt, without_prefix_cache(kv_policy))
        except Rejected:
            pass  # the recorded turn meets the same refusal and records it
