"""The `kvmux bench` command: in-process speed/memory benchmark, or serving load with `--url`.

    kvmux bench --presets full,streaming_llm --lengths 1K,2K --new-tokens 16 --repeats 3
    kvmux bench --shape llama3-8b --device cuda --lengths 32K,64K,128K --repeats 2
    kvmux bench --url http://127.0.0.1:8000 --presets full --lengths 2K --new-tokens 64 --concurrency 1,2,4,8

Writes `bench.{json,md,png}` (or `serve_load.{json,md,png}` in load mode) under `--out`.
`add_bench_parser(subparsers)` registers the subcommand on the `kvmux` parser; `main(argv)`
runs it stand-alone (`python -m kvmux.evals.bench.cli ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from kvmux import cli_args
from kvmux.evals.helpers import command_line, load_tokenizer, shared_overrides


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object; returns the new parser."""
    bench = cli_args.add_subcommand(
        subparsers,
        "bench",
        "speed and memory per preset vs transformers generate (or serving load with --url)",
        __doc__,
    )
    cli_args.add_presets_flag(bench, "server default")
    bench.add_argument(
        "--lengths",
        type=cli_args.token_counts,
        default=None,
        help="prompt tokens, e.g. 1K,2K,4K (default 1K,2K,4K)",
    )
    bench.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    bench.add_argument("--repeats", type=int, default=3, help="measured rounds (median and spread)")
    bench.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    bench.add_argument("--shape", default=None, help="random-weight model of a named shape (see evals/bench/shapes.py)")
    bench.add_argument(
        "--max-context", type=cli_args.parse_tokens, default=None, help="context length of a --shape model"
    )
    bench.add_argument("--tokenizer", default=None, help="tokenizer folder for a --shape model (text prompts)")
    cli_args.add_model_flags(bench)
    cli_args.add_run_flags(bench)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--baseline-max-tokens",
        type=cli_args.parse_tokens,
        default=None,
        help="do not time transformers generate above this prompt length (default: always)",
    )
    bench.add_argument(
        "--peers",
        type=cli_args.names,
        default=[],
        help="transformers rows besides `generate` (off by default), comma list: generate_static (static "
        "cache), generate_static_compiled (static cache + torch.compile'd forward; compiled in the warm-up "
        "round, which --warmup must then keep >= 1; a compile failure is the row's note); with --url: "
        "generate_batch (transformers continuous batching in this process on the same prompts)",
    )
    bench.add_argument(
        "--bandwidth-mib", type=int, default=None, help="tensor size of the start-up bandwidth test (default 256 CPU)"
    )
    bench.add_argument(
        "--profile-decode",
        type=int,
        default=0,
        metavar="K",
        help="instead of timing: profile K decode steps per preset and generate (torch.profiler) at each "
        "length (default 1K) and write decode_profile.{json,md}: ms per token by op category",
    )
    bench.add_argument(
        "--no-lean-decode",
        dest="lean_decode",
        action="store_false",
        help="run kvmux's decode steps through the model's own forward instead of the lean layer loop "
        "(models/lean_decode.py), for before/after comparisons",
    )
    bench.add_argument("--policy-overrides", default=None, help="JSON: {param: value} for all, or {preset: {...}}")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    load = bench.add_argument_group("serving load (against a running OpenAI-compatible server)")
    cli_args.add_url_flags(load, "server base URL, e.g. http://127.0.0.1:8000")
    load.add_argument("--concurrency", type=cli_args.comma_list(int), default=[1, 2, 4, 8])
    load.add_argument("--num-requests", type=int, default=None, help="requests per level (default max(8, 2×c))")
    load.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    bench.set_defaults(func=bench_command)
    return bench


def select_presets(folder: Path, names: list[str] | None, overrides_text: str | None) -> dict[str, Any]:
    """Load presets, keep `names` (default all), apply and validate overrides."""
    from kvmux.policies.presets import PresetError, load_presets, resolve_request_policy

    available = load_presets(folder)
    names = names or list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f"unknown preset(s) {missing}; available: {sorted(available)}")
    overrides = shared_overrides(overrides_text, names)
    used: set[str] = set()
    selected = {}
    for name in names:
        fields = set(type(available[name].params).model_fields)
        applicable = {k: v for k, v in overrides[name].items() if k in fields}
        used |= set(applicable)
        try:
            selected[name], _ = resolve_request_policy({"preset": name, **applicable}, available, name)
        except PresetError as exc:
            raise SystemExit(f"--policy-overrides for '{name}': {exc.message}") from None
    unused = sorted({k for o in overrides.values() for k in o} - used)
    if unused:
        raise SystemExit(f"--policy-overrides: no selected preset has parameter(s) {unused}")
    return selected


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_model(args: argparse.Namespace):
    from kvmux.models.loader import load_model, resolve_device, resolve_dtype

    cli_args.apply_threads(args.threads)
    if args.shape:
        from kvmux.evals.bench.shapes import build_random_model

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        loaded = build_random_model(args.shape, device, dtype, args.seed, args.max_context, tokenizer)
        return loaded, f"random weights, shape {args.shape}"
    return load_model(cli_args.model_spec(args)), args.model or "embedded"


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    """The in-process benchmark; the report is rewritten after each length (a cut run keeps its data)."""
    from kvmux.evals.bench.peers import STATIC_PEERS
    from kvmux.evals.bench.report import write_report
    from kvmux.evals.bench.run import BenchSettings, run_bench

    presets = select_presets(cli_args.presets_dir(args), args.presets, args.policy_overrides)
    if unknown := sorted(set(args.peers) - set(STATIC_PEERS)):  # generate_batch is the --url mode's
        raise SystemExit(f"--peers {unknown}: in-process peers are {', '.join(STATIC_PEERS)} (generate_batch: --url)")
    if "generate_static_compiled" in args.peers and args.warmup < 1:
        raise SystemExit("--peers generate_static_compiled needs --warmup >= 1 (compiling belongs to warm-up)")
    settings = BenchSettings(
        lengths=tuple(args.lengths or [1024, 2048, 4096]),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        prefill_chunk_tokens=args.prefill_chunk,
        seed=args.seed,
        baseline_max_tokens=args.baseline_max_tokens,
        peers=tuple(args.peers),
        bandwidth_mib=args.bandwidth_mib,
        lean_decode=args.lean_decode,
    )
    loaded, source = _load_model(args)
    _say(
        f"bench: {loaded.info.served_name} on {loaded.info.device}, presets {list(presets)}, lengths {settings.lengths}"
    )
    command = command_line("bench")
    return run_bench(
        loaded.model,
        loaded.info,
        presets,
        settings,
        loaded.tokenizer,
        source,
        progress=_say,
        checkpoint=lambda partial: write_report(partial | {"command": command}, args.out),
    )


def run_serving_load(args: argparse.Namespace) -> dict[str, Any]:
    from kvmux.evals.bench.serve_load import LoadSettings, run_load

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if unknown := sorted(set(args.peers) - {"generate_batch"}):
        raise SystemExit(f"--peers {unknown}: with --url the peer is generate_batch (the others: without --url)")

    names = args.presets or []
    overrides = shared_overrides(args.policy_overrides, names)
    kv_policies = {n: ({"preset": n, **overrides[n]} if overrides[n] else n) for n in names} or None
    docs = []
    for length in args.lengths or [1024]:
        settings = LoadSettings(
            prompt_tokens=length,
            max_tokens=args.new_tokens,
            concurrency=tuple(args.concurrency),
            num_requests=args.num_requests,
            endpoint=args.endpoint,
            timeout_s=args.timeout,
            seed=args.seed,
        )
        docs.append(asyncio.run(run_load(args.url, settings, kv_policies, args.served_model, progress=_say)))
    if "generate_batch" in args.peers:
        from kvmux.evals.bench.batch_peer import run_batch_peer

        loaded, _ = _load_model(args)
        for d in docs:
            d["peers"] = run_batch_peer(loaded.model, loaded.tokenizer, d, args.prefill_chunk, _say)
    doc = docs[0]
    doc["settings"]["prompt_tokens"] = [d["settings"]["prompt_tokens"] for d in docs]
    doc["results"] = [row for d in docs for row in d["results"]]
    doc["peers"] = [row for d in docs for row in d.get("peers", [])]
    return doc


def run_decode_profile(args: argparse.Namespace) -> dict[str, Path]:
    """`--profile-decode K`: the per-token breakdown of every preset and generate, written under --out."""
    from kvmux.evals.bench.profile import run_profile, write_profile

    presets = select_presets(cli_args.presets_dir(args), args.presets, args.policy_overrides)
    loaded, source = _load_model(args)
    lengths = args.lengths or [1024]
    doc = run_profile(
        loaded.model,
        loaded.info,
        presets,
        lengths,
        args.profile_decode,
        loaded.tokenizer,
        args.prefill_chunk,
        _say,
        args.lean_decode,
    )
    doc["model"]["source"], doc["command"] = source, command_line("bench")
    return write_profile(doc, args.out)


def bench_command(args: argparse.Namespace) -> int:
    from kvmux.evals.bench.report import write_report

    if args.profile_decode:
        paths = run_decode_profile(args)
    else:
        doc = run_serving_load(args) if args.url else run_in_process(args)
        doc["command"] = command_line("bench")
        paths = write_report(doc, args.out)
    for path in paths.values():
        _say(f"wrote {path}")
    print(paths["md"].read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_args.run_subcommand("bench", add_bench_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
