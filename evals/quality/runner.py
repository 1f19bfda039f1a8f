"""The eval grid: policy variants x tasks x lengths x depths x samples, resumable.

Each sample is generated once (seeded, see `evals/tasks/common.py`) and sent to every policy variant,
so all variants read the very same prompts. Results go to `<out>/results.json` after every
sample; on a re-run, finished cells and finished samples are read back and skipped. A cell
whose prompts do not fit the policy's context (the model's context unless the policy extends
it, `Policy.context_limit`) is recorded as `rejected` with the reason, and the grid goes on.

Shared-context tasks (several questions about one context, asked turn by turn) run per variant and
prefix-cache mode through `turns.py`.

Scoring follows RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654); the stream
perplexity cell follows StreamingLLM (https://arxiv.org/abs/2309.17453), see `stream.py`.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from kvmux.evals.quality.backends import Rejected
from kvmux.evals.quality.config import EvalConfig as EvalConfig
from kvmux.evals.quality.config import Variant as Variant
from kvmux.evals.quality.config import make_variants as make_variants
from kvmux.evals.quality.results import ResultStore, cell_key, summarize
from kvmux.evals.quality.scoring import score
from kvmux.evals.quality.stream import generate_after_stream, measure_stream
from kvmux.evals.quality.turns import TurnRunner
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer, Sample, TaskLengthError


def depths_for(task: Any, depths: list[float]) -> list[float | None]:
    return list(depths) if task.uses_depth and depths else [None]


class EvalRunner:
    def __init__(self, config: EvalConfig, backend: Any, progress: bool = True):
        for name in config.tasks:
            get_task(name)  # unknown names fail before any work
        self.config = config
        self.backend = backend
        self.renderer = Renderer(backend.tokenizer, chat=config.chat)
        meta = {
            "model": backend.model_name,
            "backend": backend.kind,
            "url": getattr(backend, "url", None),
            "format": self.renderer.name,
            "seed": config.seed,
            "query": config.send_query,
            "ppl_chunk": config.ppl_chunk,
            "ppl_window": config.ppl_window,
        }
        self.store = ResultStore(config.out / "results.json", meta)
        self.progress = progress
        self._policy_names: dict[str, str] = {}
        self.turns = TurnRunner(config, backend, self.store, self.renderer, self._policy_name, self._limit_message)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _grid(self) -> list[tuple[str, int, float | None]]:
        cells = []
        for name in self.config.tasks:
            for length in self.config.lengths:
                for depth in depths_for(get_task(name), self.config.depths):
                    cells.append((name, length, depth))
        return cells

    def _policy_name(self, variant: Variant) -> str:
        if variant.label not in self._policy_names:
            try:
                self._policy_names[variant.label] = self.backend.policy_name(variant.kv_policy(None))
            except Rejected:
                self._policy_names[variant.label] = "?"
        return self._policy_names[variant.label]

    def _cell(self, variant: Variant, task: Any, length: int, depth: float | None) -> dict[str, Any]:
        return self.store.cell(
            cell_key(variant.label, task.name, length, depth),
            label=variant.label,
            preset=variant.preset,
            overrides=variant.overrides,
            policy=self._policy_name(variant),
            task=task.name,
            metric=task.metric,
            length=length,
            depth=depth,
        )

    def _finish(self, cell: dict[str, Any], status: str, message: str | None = None) -> None:
        cell["status"], cell["message"] = status, message
        cell["summary"] = summarize(cell)
        self.store.save()

    def _limit_message(self, variant: Variant, needed: int) -> str | None:
        try:
            limit = self.backend.context_limit(variant.kv_policy(None))
        except Rejected as exc:
            return exc.message
        if limit is not None and needed > limit:
            return (
                f"needs {needed} tokens but preset '{variant.label}' accepts at most {limit} "
                "(the model's context; only policies that extend context run past it)"
            )
        return None

    # -- the grid ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        grid = self._grid()
        total = len(grid) * len(self.config.variants) * self.config.samples
        with tqdm(total=total, desc="eval", unit="sample", disable=not self.progress, file=sys.stderr) as bar:
            for name, length, depth in grid:
                task = get_task(name)
                if task.metric == "perplexity":
                    self._run_stream_cell(task, length, bar)
                elif getattr(task, "shared_context", False):
                    self.turns.run(task, length, bar)
                else:
                    self._run_cell(task, length, depth, bar)
        self.store.save()
        return self.store.data

    def _run_cell(self, task: Any, length: int, depth: float | None, bar: tqdm) -> None:
        cfg = self.config
        cells = {v.label: self._cell(v, task, length, depth) for v in cfg.variants}
        for cell in cells.values():  # a larger --samples reopens finished cells; their samples stay
            if cell["status"] == "done" and len(cell["samples"]) < cfg.samples:
                cell["status"] = "partial"
        pending = [v for v in cfg.variants if cells[v.label]["status"] not in ("done", "rejected")]
        bar.update((len(cfg.variants) - len(pending)) * cfg.samples)
        if not pending:
            return
        bar.set_postfix_str(f"{task.name} {length} depth={depth}")
        for index in range(cfg.samples):
            todo = [
                v
                for v in pending
                if cells[v.label]["status"] == "partial"
                and index not in {s["index"] for s in cells[v.label]["samples"]}
            ]
            if not todo:
                bar.update(len(pending))
                continue
            try:
                sample = task.make(self.renderer, length, depth, index, cfg.seed, cfg.max_new_tokens or 0)
            except TaskLengthError as exc:
                for v in todo:
                    self._finish(cells[v.label], "rejected", f"length {length} is too short for {task.name}: {exc}")
                bar.update(len(pending) * (cfg.samples - index))
                return
            for v in pending:
                if v in todo:
                    self._run_sample(v, cells[v.label], sample)
                bar.update(1)
        for v in pending:
            if cells[v.label]["status"] == "partial":
                self._finish(cells[v.label], "done")

    def _run_sample(self, variant: Variant, cell: dict[str, Any], sample: Sample) -> None:
        needed = sample.prompt_tokens + sample.max_new_tokens
        message = self._limit_message(variant, needed)
        if message is None:
            kv_policy = variant.kv_policy(sample.query if self.config.send_query else None)
            try:
                if sample.decode_from is None:
                    out = self.backend.generate(sample, kv_policy)
                else:
                    out = generate_after_stream(self.backend, sample, kv_policy, self.config.ppl_chunk)
            except Rejected as exc:
                message = exc.message
        if message is not None:
            self._finish(cell, "rejected", message)
            return
        cell["samples"].append(
            {
                "index": sample.index,
                "prompt_sha256": sample.prompt_sha256,
                "prompt_tokens": sample.prompt_tokens,
                "answers": sample.answers,
                "prediction": out.text,
                "score": score(sample.metric, out.text, sample.answers),
                "finish_reason": out.finish_reason,
                "completion_tokens": out.completion_tokens,
                "seconds": round(out.seconds, 3),
                "kv": out.kv,
            }
        )
        cell["summary"] = summarize(cell)
        self.store.save()

    def _run_stream_cell(self, task: Any, length: int, bar: tqdm) -> None:
        cfg = self.config
        for variant in cfg.variants:
            cell = self._cell(variant, task, length, None)
            if cell["status"] in ("done", "rejected"):
                bar.update(cfg.samples)
                continue
            message = self._limit_message(variant, length)
            if message is not None:
                self._finish(cell, "rejected", message)
                bar.update(cfg.samples)
                continue
            done = {s["index"] for s in cell["samples"]}
            for index in range(cfg.samples):
                if index in done:
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{task.name} {length} {variant.label} #{index}")
                try:
                    session, runner = self.backend.open_session(variant.kv_policy(None))
                except Rejected as exc:
                    self._finish(cell, "rejected", exc.message)
                    bar.update(cfg.samples - index)
                    break
                ids = task.tokens(self.backend.tokenizer, length, index, cfg.seed)
                result = measure_stream(session, runner, ids, cfg.ppl_chunk, cfg.ppl_window)
                cell["samples"].append({"index": index, **result})
                cell["summary"] = summarize(cell)
                self.store.save()
                bar.update(1)
            if cell["status"] == "partial":
                self._finish(cell, "done")
