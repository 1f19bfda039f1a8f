"""The `kvmux bench` command: in-process speed/memory benchmark, or serving load with `--url`.

    kvmux bench --presets full,streaming_llm --lengths 1K,2K --new-tokens 16 --repeats 3
    kvmux bench --shape llama3-8b --device cuda --lengths 32K,64K,128K --repeats 2
    kvmux bench --url http://127.0.0.1:8000 --presets full --lengths 2K --new-tokens 64 --concurrency 1,2,4,8

Writes `bench.{json,md,png}` (or `serve_load.{json,md,png}` in load mode) under `--out`.
`add_bench_parser(subparsers)` registers the subcommand on the `kvmux` parser; `main(argv)`
runs it stand-alone (`python -m kvmux.evals.bench_cli ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any


def parse_tokens(text: str) -> int:
    """'2048', '2K', '2k' -> 2048; '1M' -> 1048576."""
    text = text.strip()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token count must be positive: {text!r}")
    return value


def token_list(text: str) -> list[int]:
    return [parse_tokens(part) for part in text.split(",") if part.strip()]


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def default_presets_dir() -> Path:
    import kvmux.policies

    beside_package = Path(kvmux.policies.__file__).resolve().parents[1] / "configs" / "policies"
    return beside_package if beside_package.is_dir() else Path("configs/policies")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object; returns the new parser."""
    bench = subparsers.add_parser(
        "bench",
        help="speed and memory per preset vs transformers generate (or serving load with --url)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--presets", type=name_list, default=None, help="comma list (default: all; --url: server default)"
    )
    bench.add_argument(
        "--lengths", type=token_list, default=None, help="prompt tokens, e.g. 1K,2K,4K (default 1K,2K,4K)"
    )
    bench.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per run")
    bench.add_argument("--repeats", type=int, default=3, help="measured rounds (median and spread)")
    bench.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    bench.add_argument("--shape", default=None, help="random-weight model of a named shape (see evals/shapes.py)")
    bench.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the embedded model)")
    bench.add_argument("--max-context", type=parse_tokens, default=None, help="context length of a --shape model")
    bench.add_argument("--tokenizer", default=None, help="tokenizer folder for a --shape model (text prompts)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    bench.add_argument("--prefill-chunk", type=parse_tokens, default=2048, help="tokens per prefill forward")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--baseline-max-tokens",
        type=parse_tokens,
        default=None,
        help="do not time transformers generate above this prompt length (default: always)",
    )
    bench.add_argument("--presets-dir", type=Path, default=None, help="folder of preset YAML files")
    bench.add_argument("--policy-overrides", default=None, help="JSON: {param: value} for all, or {preset: {...}}")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    load = bench.add_argument_group("serving load (against a running OpenAI-compatible server)")
    load.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    load.add_argument("--concurrency", type=lambda t: [int(x) for x in name_list(t)], default=[1, 2, 4, 8])
    load.add_argument("--num-requests", type=int, default=None, help="requests per level (default max(8, 2×c))")
    load.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load.add_argument("--served-model", default=None, help="model name to send (default: first of /v1/models)")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    bench.set_defaults(func=bench_command)
    return bench


def parse_overrides(text: str | None, preset_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-preset parameter overrides from `--policy-overrides`.

    `{"window": 512}` applies to every preset (the CLI drops keys a preset's policy lacks);
    `{"streaming_llm": {"window": 512}}` targets presets by name.
    """
    if not text:
        return {name: {} for name in preset_names}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"--policy-overrides is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit("--policy-overrides must be a JSON object")
    if data and all(isinstance(v, dict) for v in data.values()):
        unknown = sorted(set(data) - set(preset_names))
        if unknown:
            raise SystemExit(f"--policy-overrides names presets not selected: {unknown}")
        return {name: dict(data.get(name, {})) for name in preset_names}
    return {name: dict(data) for name in preset_names}


def select_presets(folder: Path, names: list[str] | None, overrides_text: str | None) -> dict[str, Any]:
    """Load presets, keep `names` (default all), apply and validate overrides."""
    from kvmux.policies.presets import PresetError, load_presets, resolve_request_policy

    available = load_presets(folder)
    names = names or list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f"unknown preset(s) {missing}; available: {sorted(available)}")
    overrides = parse_overrides(overrides_text, names)
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


def _command_line() -> str:
    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1 :]
    return shlex.join(["kvmux", "bench", *argv])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_tokenizer(folder: str | Path):
    """A tokenizer from a local folder (never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def embedded_tokenizer_dir() -> Path | None:
    """The embedded model's tokenizer folder if it was already materialised on this machine."""
    from kvmux.models.embedded import EMBEDDED_NAME, cache_dir

    found = sorted(cache_dir().glob(f"{EMBEDDED_NAME}*/tokenizer.json"))
    return found[-1].parent if found else None


def _load_model(args: argparse.Namespace):
    import torch

    from kvmux.models.loader import ModelSpec, load_model, resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        from kvmux.evals.shapes import build_random_model

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        loaded = build_random_model(args.shape, device, dtype, args.seed, args.max_context, tokenizer)
        return loaded, f"random weights, shape {args.shape}"
    spec = ModelSpec(model=args.model, device=args.device, dtype=args.dtype, prefill_chunk_tokens=args.prefill_chunk)
    return load_model(spec), args.model or "embedded"


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    """The in-process benchmark; the report is rewritten after each length (a cut run keeps its data)."""
    from kvmux.evals.bench import BenchSettings, run_bench
    from kvmux.evals.bench_report import write_report

    presets = select_presets(args.presets_dir or default_presets_dir(), args.presets, args.policy_overrides)
    settings = BenchSettings(
        lengths=tuple(args.lengths or [1024, 2048, 4096]),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        prefill_chunk_tokens=args.prefill_chunk,
        seed=args.seed,
        baseline_max_tokens=args.baseline_max_tokens,
    )
    loaded, source = _load_model(args)
    _say(
        f"bench: {loaded.info.served_name} on {loaded.info.device}, presets {list(presets)}, lengths {settings.lengths}"
    )
    command = _command_line()
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
    from kvmux.evals.serve_load import LoadSettings, run_load

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    names = args.presets or []
    overrides = parse_overrides(args.policy_overrides, names)
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
    doc = docs[0]
    doc["settings"]["prompt_tokens"] = [d["settings"]["prompt_tokens"] for d in docs]
    doc["results"] = [row for d in docs for row in d["results"]]
    return doc


def bench_command(args: argparse.Namespace) -> int:
    from kvmux.evals.bench_report import write_report

    doc = run_serving_load(args) if args.url else run_in_process(args)
    doc["command"] = _command_line()
    paths = write_report(doc, args.out)
    for path in paths.values():
        _say(f"wrote {path}")
    print(paths["md"].read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmux")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
