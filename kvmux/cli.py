"""The `kvmux` command: serve, generate, policies, eval, bench, calibrate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from kvmux.cli_args import add_model_flags


def _int_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _config_from_args(args: argparse.Namespace):
    from kvmux.server.config import load_server_config

    config = load_server_config(args.config)
    model_updates = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "trust_remote_code": args.trust_remote_code,
        "allow_download": args.allow_download,
        "max_model_len": args.max_model_len,
    }
    model = config.model.model_copy(update={k: v for k, v in model_updates.items() if v is not None})
    updates = {"model": model}
    for name in (
        "host",
        "port",
        "presets_dir",
        "default_preset",
        "max_active_sessions",
        "max_queued_requests",
        "max_prompt_tokens",
        "max_query_tokens",
        "max_new_tokens",
        "request_timeout_s",
        "max_connections",
        "shutdown_grace_s",
        "kv_memory_budget_bytes",
        "prefix_cache_bytes",
    ):
        value = getattr(args, name, None)
        if value is not None:
            updates[name] = value
    api_keys = list(getattr(args, "api_key", None) or [])
    if os.environ.get("KVMUX_API_KEY"):
        api_keys.append(os.environ["KVMUX_API_KEY"])
    if api_keys:
        updates["api_keys"] = api_keys
    if getattr(args, "no_batch_decode", False):
        updates["batch_decode"] = False
    if getattr(args, "no_prefix_cache", False):
        updates["prefix_cache_bytes"] = 0
    if getattr(args, "allow_unauthenticated", False):
        updates["allow_unauthenticated"] = True
    if getattr(args, "cors_origin", None):
        updates["cors_origins"] = args.cors_origin
    replicas = {"num_replicas": getattr(args, "replicas", None), "ray_address": getattr(args, "ray_address", None)}
    if any(v is not None for v in replicas.values()):
        updates["replicas"] = config.replicas.model_copy(update={k: v for k, v in replicas.items() if v is not None})
    return type(config).model_validate({**config.model_dump(), **updates})


def cmd_serve(args: argparse.Namespace) -> int:
    from kvmux.server.serve import create_app, run_server, unauthenticated_exposure

    config = _config_from_args(args)
    refusal = unauthenticated_exposure(config)
    if refusal:
        print(f"kvmux serve: {refusal}", file=sys.stderr)
        return 2
    if config.replicas.distributed:  # several replicas (or a cluster to join): Ray Serve
        from kvmux.server.replicas.launch import serve_replicas

        return serve_replicas(config)
    app = create_app(config)
    # the hub token is needed only to fetch the model: keep it out of the serving process from now on
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        os.environ.pop(name, None)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; after a clean shutdown exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    run_server(app, config, log_level=args.log_level)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kvmux.server.sampling import SamplingParams
    from kvmux.server.serve import build_engine

    config = _config_from_args(args)
    engine = build_engine(config)
    kv_policy: str | dict = args.policy
    if args.params:
        kv_policy = {"preset": args.policy, **json.loads(args.params)}
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.chat:
        request = engine.prepare(
            messages=[{"role": "user", "content": args.prompt}], sampling=sampling, kv_policy=kv_policy
        )
    else:
        request = engine.prepare(prompt=args.prompt, sampling=sampling, kv_policy=kv_policy)
    state = engine.start(request)
    for event in engine.drive(state):
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(json.dumps({"kv": state.kv_stats(), "finish_reason": state.finish_reason}), file=sys.stderr)
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    from kvmux.policies.presets import load_presets
    from kvmux.policies.registry import import_policy_modules
    from kvmux.server.config import load_server_config

    config = load_server_config(args.config)
    import_policy_modules(config.policy_modules)
    presets = load_presets(Path(args.presets_dir or config.presets_dir))
    if args.json:
        print(json.dumps([p.as_dict() for p in presets.values()], indent=1))
        return 0
    for preset in presets.values():
        params = ", ".join(f"{k}={v}" for k, v in preset.params.model_dump().items())
        paper = f"arXiv {preset.policy.paper}" if preset.policy.paper else "baseline"
        print(f"{preset.name:28s} {preset.policy.name:16s} {paper:18s} {params}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_flags(serve, server=True)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--default-preset", default=None)
    serve.add_argument("--max-active-sessions", type=int, default=None)
    serve.add_argument("--max-queued-requests", type=int, default=None)
    serve.add_argument("--max-prompt-tokens", type=_int_or_auto, default=None, help="a number or 'auto'")
    serve.add_argument("--max-query-tokens", type=int, default=None, help="longest kv_policy.query, in tokens")
    serve.add_argument("--max-new-tokens", type=int, default=None)
    serve.add_argument("--request-timeout-s", type=float, default=None)
    serve.add_argument("--max-connections", type=int, default=None, help="open connections before 503")
    serve.add_argument("--shutdown-grace-s", type=float, default=None, help="bound on the whole SIGTERM shutdown")
    serve.add_argument("--kv-memory-budget-bytes", type=_int_or_auto, default=None, help="a number or 'auto'")
    serve.add_argument(
        "--prefix-cache-bytes", type=_int_or_auto, default=None, help="prefix cache size: a number or 'auto'"
    )
    serve.add_argument("--no-prefix-cache", action="store_true", help="turn the prefix cache off")
    serve.add_argument("--api-key", action="append", help="require this Bearer key (repeatable; env KVMUX_API_KEY)")
    serve.add_argument("--cors-origin", action="append", help="allow this CORS origin (repeatable)")
    serve.add_argument("--no-batch-decode", action="store_true", help="decode every request in its own forward")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without an API key (refused otherwise)",
    )
    serve.add_argument(
        "--replicas", type=int, default=None, help="serve N model replicas on Ray Serve (needs kvmux[ray])"
    )
    serve.add_argument("--ray-address", default=None, help="with --replicas: join this Ray cluster (head:6379)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="one-shot generation streamed to stdout")
    add_model_flags(gen, server=True)
    gen.add_argument("prompt")
    gen.add_argument("--policy", default="full", help="preset name")
    gen.add_argument("--params", default=None, help="JSON overrides, e.g. '{\"window\": 512}'")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)

    pol = sub.add_parser("policies", help="list the policy presets")
    pol.add_argument("--config", type=Path, default=None, help="server YAML (default: configs/server.yaml)")
    pol.add_argument("--presets-dir", type=Path, default=None, help="folder of policy preset YAML files")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=cmd_policies)

    from kvmux.evals.bench.cli import add_bench_parser
    from kvmux.evals.calibrate.cli import add_calibrate_parser
    from kvmux.evals.quality.cli import add_eval_parser

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
