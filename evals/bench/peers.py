"""Peer rows of `kvmux bench` besides the `generate` baseline: the transformers fast path.

- `generate_static`: `model.generate` (greedy, SDPA, exactly N new tokens with EOS banned as the
  baseline bans it) with `cache_implementation="static"`: a preallocated cache of prompt + N
  tokens that generate sizes itself (`max_length`), every step attending over the whole
  allocation under a mask.
- `generate_static_compiled`: the same with the model's forward compiled by `torch.compile`
  (fixed shapes, `dynamic=False`; mode `reduce-overhead`, i.e. CUDA graphs, on CUDA and
  `default`, inductor C++ kernels, on CPU), the fast path transformers documents for static
  caches. The compiled forward is made once per model and kept, so the bench's warm-up round
  pays the compilation (one graph for the prompt's shape, one for a decode step) and the measured
  rounds never do. generate's own auto-compilation is turned off (`disable_compile`), so the
  forward is compiled once, the same way on every device. If compiling fails, the run raises
  `PeerError` naming the cause; the bench reports it in the row's note and goes on.

The `generate` row stays the reference of every ratio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from kvmux.evals.bench.measure import RunSample, run_generate
from kvmux.evals.bench.probes import MemoryProbe

STATIC = "generate_static"
STATIC_COMPILED = "generate_static_compiled"
STATIC_PEERS = (STATIC, STATIC_COMPILED)
_COMPILED_ATTR = "_kvmux_bench_compiled_forward"


class PeerError(RuntimeError):
    """A peer could not run on this machine (e.g. torch.compile failed); the message says why."""


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode for the compiled peer: CUDA graphs on CUDA, plain inductor elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def peer_params(name: str, device: torch.device) -> dict[str, Any]:
    """What a peer row runs, for the report's params column."""
    params: dict[str, Any] = {"attn_implementation": "sdpa", "cache_implementation": "static"}
    if name == STATIC_COMPILED:
        params |= {"compile": "torch.compile", "mode": compile_mode(device), "dynamic": False}
    return params


@contextlib.contextmanager
def compiled_forward(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run the model with a `torch.compile`d forward, made once per model and mode and reused."""
    compiled = model.__dict__.setdefault(_COMPILED_ATTR, {})
    if mode not in compiled:
        compiled[mode] = torch.compile(model.forward, mode=mode, dynamic=False)
    own = model.__dict__.get("forward")  # an instance-level forward (e.g. a hook) to put back
    model.forward = compiled[mode]
    try:
        yield
    finally:
        if own is not None:
            model.forward = own
        else:
            del model.forward


def _compile_failure(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or "compile" in str(exc).lower()


def run_static(
    model: torch.nn.Module, info, ids: torch.Tensor, new_tokens: int, probe: MemoryProbe, compiled: bool
) -> RunSample:
    """One greedy generation of `new_tokens` tokens through a static cache, compiled or not."""
    options = {"cache_implementation": "static", "disable_compile": True}
    if not compiled:
        return run_generate(model, info, ids, new_tokens, probe, **options)
    try:
        with compiled_forward(model, compile_mode(info.device)):
            return run_generate(model, info, ids, new_tokens, probe, **options)
    except Exception as exc:  # a compiler failure becomes the row's note
        if isinstance(exc, torch.OutOfMemoryError) or not _compile_failure(exc):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PeerError(f"torch.compile failed: {type(exc).__name__}: {first_line[:300]}") from exc


def peer_runner(name: str):
    """The run function `(model, info, ids, new_tokens, probe) -> RunSample` of a static peer."""
    if name not in STATIC_PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(STATIC_PEERS)}")
    compiled = name == STATIC_COMPILED
    return lambda model, info, ids, new_tokens, probe: run_static(model, info, ids, new_tokens, probe, compiled)
