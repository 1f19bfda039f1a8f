"""`kvmux eval`: long-context quality of every policy preset on the same seeded tasks.

Tasks: passkey (landmark attention), RULER's niah family, vt and cwe, a synthetic document QA,
recall of a fact through text fed as decoding (decode_recall; in-process only), stream
perplexity (StreamingLLM), and shared-context questions asked turn by turn about one context
(scb_kv, scb_multiturn; SCBench-style, with the prefix cache on and off). Runs in-process on a
loaded model, or against any OpenAI-compatible server with --url (the question is sent as
kv_policy.query; `default` as a preset name sends no kv_policy). Results are resumable:
re-running the same command skips the cells already in <out>/results.json. Writes
results.json, summary.md and PNG plots.

Examples:
  kvmux eval --presets full,streaming_llm --tasks passkey --lengths 2K --depths 0,100 --samples 1
  kvmux eval --tasks stream_ppl --lengths 16K --presets streaming_llm --ppl-chunk 1
  kvmux eval --tasks decode_recall --lengths 1280 --depths 60 --presets full,lazy_eviction --ppl-chunk 16
  kvmux eval --url http://127.0.0.1:8000 --presets full,streaming_llm --tasks niah_single
  kvmux eval --presets streaming_llm --policy-overrides '{"streaming_llm": [{"window": 256}, {"window": 1020}]}'
  kvmux eval --presets full,hip --tasks scb_kv --lengths 4K --samples 4 --turns 5 --prefix-cache both
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvmux import cli_args
from kvmux.evals.helpers import command_line, embedded_tokenizer_dir, load_tokenizer, sweep_overrides
from kvmux.evals.tasks import TASKS
from kvmux.evals.tasks.shared_context import CACHE_MODES, DEFAULT_TURNS

DEFAULT_TASKS = "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,qa"


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on an argparse subparsers object; returns the new parser."""
    p = cli_args.add_subcommand(
        subparsers,
        "eval",
        "long-context quality per preset (passkey, RULER tasks, QA, stream perplexity)",
        __doc__,
    )
    cli_args.add_presets_flag(p, "'default'")
    p.add_argument(
        "--tasks",
        type=cli_args.names,
        default=cli_args.names(DEFAULT_TASKS),
        help=f"comma list ({DEFAULT_TASKS})",
    )
    p.add_argument(
        "--lengths",
        type=cli_args.token_counts,
        default=[2048, 4096, 8192],
        help="tokens, e.g. 2K,4K,8K",
    )
    p.add_argument(
        "--depths", type=cli_args.comma_list(float), default=[0, 25, 50, 75, 100], help="needle depths in percent"
    )
    p.add_argument("--samples", type=int, default=3, help="samples per cell")
    p.add_argument("--seed", type=int, default=42)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", help="chat template, answer prefix opens the reply")
    fmt.add_argument("--raw", dest="chat", action="store_false", help="plain prompt + answer prefix (default)")
    p.set_defaults(chat=False)
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="output folder (resumable)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (default: per task, as RULER)")
    p.add_argument(
        "--policy-overrides",
        default=None,
        help='JSON: {"preset": {param: value}} or {"preset": [{...}, {...}]} for a budget sweep',
    )
    p.add_argument("--no-query", dest="send_query", action="store_false", help="do not pass the question")
    p.add_argument(
        "--prefix-reuse",
        action="store_true",
        help="in-process: before each sample, ask a different question about the same context, so the sample "
        "starts from the prefix cache (measures what reusing a policy's state changes)",
    )
    p.add_argument(
        "--prefix-cache",
        choices=(*CACHE_MODES, "both"),
        default="both",
        help="shared-context tasks (scb_*): run the turns with the prefix cache on, off (kv_policy.cache: false) "
        "or both, to compare time to first token and answers (default: both)",
    )
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="shared-context tasks: questions per context")
    p.add_argument(
        "--ppl-chunk",
        type=int,
        default=1,
        help="tokens per forward where a task streams text through the policy (stream_ppl, decode_recall; "
        "1 = token by token)",
    )
    p.add_argument("--ppl-window", type=int, default=256, help="stream_ppl tokens per reported window")
    cli_args.add_url_flags(p, "OpenAI-compatible server to score instead of the in-process model")
    p.add_argument("--tokenizer", default=None, help="--url: tokenizer folder (default: the embedded model's)")
    cli_args.add_model_flags(p)
    cli_args.add_run_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from <out>/results.json")
    p.set_defaults(func=eval_command)
    return p


def engine_prefix_cache(args: argparse.Namespace) -> str | None:
    """The in-process engine's prefix cache: on (`auto`) for --prefix-reuse or when a shared-context task
    runs with the cache on; off otherwise, so the other tasks measure what they always did."""
    from kvmux.evals.quality.turns import cache_modes

    shared = any(getattr(TASKS.get(name), "shared_context", False) for name in args.tasks)
    return "auto" if args.prefix_reuse or (shared and "on" in cache_modes(args.prefix_cache)) else None


def build_engine_backend(args: argparse.Namespace):
    from kvmux.evals.quality.backends import EngineBackend
    from kvmux.models.loader import load_model
    from kvmux.policies.presets import load_presets
    from kvmux.server.engine import Engine

    cli_args.apply_threads(args.threads)
    presets = load_presets(cli_args.presets_dir(args))
    loaded = load_model(cli_args.model_spec(args))
    default = "full" if "full" in presets else next(iter(presets))
    cache = engine_prefix_cache(args)
    engine = Engine(
        loaded, presets, default_preset=default, prefill_chunk_tokens=args.prefill_chunk, prefix_cache_bytes=cache
    )
    return EngineBackend(engine, warm_prefix=args.prefix_reuse), list(presets)


def build_http_backend(args: argparse.Namespace):
    from kvmux.evals.quality.backends import HTTPBackend

    tokenizer = load_tokenizer(args.tokenizer or embedded_tokenizer_dir(materialize=True))
    return HTTPBackend(args.url, tokenizer, model=args.served_model), ["default"]


def eval_command(args: argparse.Namespace) -> int:
    from kvmux.evals.quality.report import write_report
    from kvmux.evals.quality.results import load_results
    from kvmux.evals.quality.runner import EvalConfig, EvalRunner, make_variants
    from kvmux.evals.quality.turns import cache_modes

    if args.report_only:
        try:
            results = load_results(args.out)
        except FileNotFoundError:
            raise SystemExit(f"eval: --report-only needs {args.out / 'results.json'}; run the eval first") from None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"eval: {args.out / 'results.json'} is not JSON ({exc})") from None
        for path in write_report(results, args.out):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    overrides = sweep_overrides(args.policy_overrides)
    backend, available = build_http_backend(args) if args.url else build_engine_backend(args)
    try:
        names = args.presets or available
        try:
            variants = make_variants(names, overrides)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        config = EvalConfig(
            variants=variants,
            tasks=args.tasks,
            lengths=args.lengths,
            depths=args.depths,
            samples=args.samples,
            seed=args.seed,
            chat=args.chat,
            max_new_tokens=args.max_tokens,
            send_query=args.send_query,
            ppl_chunk=args.ppl_chunk,
            ppl_window=args.ppl_window,
            out=args.out,
            cache_modes=cache_modes(args.prefix_cache),
            turns=args.turns,
        )
        try:
            runner = EvalRunner(config, backend, progress=args.progress)
        except (KeyError, ValueError) as exc:
            raise SystemExit(str(exc.args[0] if exc.args else exc)) from None
        data = runner.run()
        data["meta"]["command"] = command_line("eval")
        runner.store.save()
    finally:
        backend.close()
    for path in write_report(data, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print((args.out / "summary.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_args.run_subcommand("eval", add_eval_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
