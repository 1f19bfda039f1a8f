"""Command-line flags shared by the `kvmux` subcommands and the scripts: which model to load and how,
torch threads, the served model of a `--url`, and the values flags take (token counts such as "8K",
comma lists). Each flag is declared here once; the commands add the groups they need.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from kvmux.models.loader import ModelSpec

T = TypeVar("T")
DTYPES = ["auto", "float32", "bfloat16", "float16"]
_SCALES = {"k": 1024, "m": 1024 * 1024}


def parse_tokens(text: str) -> int:
    """A positive token count: '2048' -> 2048, '2K' or '2k' -> 2048, '1.5K' -> 1536, '1M' -> 1048576."""
    text = text.strip()
    scale = _SCALES.get(text[-1:].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token count must be positive: {text!r}")
    return value


def comma_list(convert: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type: 'a,b,c' -> [convert('a'), convert('b'), convert('c')] (empty items skipped)."""

    def parse(text: str) -> list[T]:
        try:
            return [convert(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def names(text: str) -> list[str]:
    """An argparse type: 'full,streaming_llm' -> ['full', 'streaming_llm']."""
    return comma_list(str)(text)


def token_counts(text: str) -> list[int]:
    """An argparse type: '2K,4K,8K' -> [2048, 4096, 8192]."""
    return comma_list(parse_tokens)(text)


def add_subcommand(subparsers, name: str, help: str, description: str | None) -> argparse.ArgumentParser:
    """A subcommand parser whose --help prints `description` (a module docstring) as written."""
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_presets_flag(parser: argparse._ActionsContainer, with_url: str) -> None:
    """--presets: the presets to measure; `with_url` says what a --url run measures by default."""
    parser.add_argument("--presets", type=names, default=None, help=f"comma list (default: all; --url: {with_url})")


def add_model_flags(parser: argparse._ActionsContainer, *, server: bool = False) -> None:
    """--model, --dtype, --device, --max-model-len, --presets-dir.

    `server`: the flags of `kvmux serve` / `generate`, which also take --config, --device-map,
    --trust-remote-code and --allow-download and leave every unset value to the server config.
    """
    auto = None if server else "auto"
    if server:
        parser.add_argument("--config", type=Path, default=None, help="server YAML (default: configs/server.yaml)")
    parser.add_argument("--model", default=None, help="hub id, local folder or .gguf file (default: embedded)")
    parser.add_argument("--dtype", choices=DTYPES, default=auto)
    parser.add_argument("--device", default=auto, help="auto, cpu, cuda, cuda:N")
    if server:
        parser.add_argument("--device-map", default=None, help="'auto' to shard over GPUs (accelerate)")
        parser.add_argument("--trust-remote-code", action="store_true", default=None)
        parser.add_argument("--allow-download", action="store_true", default=None, help="allow fetching hub models")
    parser.add_argument("--max-model-len", type=int, default=None, help="override the model's context length")
    parser.add_argument("--presets-dir", type=Path, default=None, help="folder of policy preset YAML files")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--prefill-chunk and --threads: how an in-process measurement runs the model."""
    parser.add_argument("--prefill-chunk", type=parse_tokens, default=2048, help="tokens per prefill forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_url_flags(parser: argparse._ActionsContainer, url_help: str) -> None:
    """--url and --served-model: measure a running OpenAI-compatible server instead of a loaded model."""
    parser.add_argument("--url", default=None, help=url_help)
    parser.add_argument("--served-model", default=None, help="--url: model name (default: the first of /v1/models)")


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads when a number was given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def default_presets_dir() -> Path:
    """The repository's preset folder, configs/policies."""
    from kvmux.server.config import REPO_CONFIGS

    return REPO_CONFIGS / "policies"


def presets_dir(args: argparse.Namespace) -> Path:
    return args.presets_dir or default_presets_dir()


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec of --model, --device, --dtype, --max-model-len and --prefill-chunk."""
    from kvmux.models.loader import ModelSpec

    return ModelSpec(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        prefill_chunk_tokens=args.prefill_chunk,
    )


def run_subcommand(name: str, add_parser: Callable, argv: list[str] | None = None) -> int:
    """Run one `kvmux` subcommand on its own (`python -m ...`); `argv` (default: the process's) are its flags."""
    parser = argparse.ArgumentParser(prog="kvmux")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
