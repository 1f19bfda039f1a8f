"""Shared setup of the `diagnose_*` scripts: one seeded needle prompt, built as `kvmux eval` builds
it (task passkey, or passkey_book for the prose haystack, or one of the niah tasks; raw format), the embedded model,
per-layer parameter overrides on a policy's session, and one greedy generation through the engine.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvmux.cli_args import apply_threads, default_presets_dir
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer, Sample
from kvmux.models.loader import LoadedModel, ModelSpec, load_model
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

ONE_PASS = 1 << 20  # a prefill chunk longer than any prompt: the prompt in one forward


def add_case_arguments(parser: argparse.ArgumentParser, policy: str, length: int, depth: float) -> None:
    """--task, --length, --depth, --index, --seed, --overrides (for `policy`'s preset), --threads."""
    parser.add_argument(
        "--task",
        choices=("passkey", "passkey_book", "niah_single", "niah_single_book", "niah_multikey", "niah_multikey_book"),
        default="passkey",
        help="task and haystack (filler, or *_book for prose)",
    )
    parser.add_argument("--length", type=int, default=length)
    parser.add_argument("--depth", type=float, default=depth)
    parser.add_argument("--index", type=int, default=0, help="sample index (as in kvmux eval)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overrides", default="{}", help=f"JSON parameters for the {policy} preset")
    parser.add_argument("--threads", type=int, default=None)


def load_case(args: argparse.Namespace, prefill_chunk: int = ONE_PASS) -> tuple[LoadedModel, Sample, list[int]]:
    """The model, the passkey sample of `args` and the prompt indices of its needle's tokens."""
    apply_threads(args.threads)
    loaded = load_model(ModelSpec(prefill_chunk_tokens=prefill_chunk))
    sample = get_task(args.task).make(Renderer(loaded.tokenizer), args.length, args.depth, args.index, args.seed, 0)
    needle = sample.needle_token_indices(loaded.tokenizer)
    print(f"prompt {sample.prompt_tokens} tokens, needle tokens {needle[0]}-{needle[-1]}, answer {sample.answers}")
    return loaded, sample, needle


def layer_values(items: list[str], cast) -> dict[int, Any]:
    """["18=0.97", "3-5=exact", ...] -> {18: cast("0.97"), 3: cast("exact"), 4: ..., 5: ...}."""
    values: dict[int, Any] = {}
    for item in items:
        layers, value = item.split("=")
        first, _, last = layers.partition("-")
        for layer in range(int(first), int(last or first) + 1):
            values[layer] = cast(value)
    return values


def override_per_layer(session_class: type, field: str, values: dict[int, Any]) -> None:
    """Patch `session_class.attention` so layer L runs with `field` = values[L] (other layers unchanged)."""
    original = session_class.attention

    def attention(self, call):
        saved = self.params
        if call.layer_idx in values:
            self.params = self.params.model_copy(update={field: values[call.layer_idx]})
        try:
            return original(self, call)
        finally:
            self.params = saved

    session_class.attention = attention


def generate(loaded: LoadedModel, sample: Sample, policy: dict, prefill_chunk: int = ONE_PASS):
    """Greedy tokens for the sample's prompt under `policy` (a kv_policy object), as many as `kvmux eval`
    generates for it; prints the verdict."""
    engine = Engine(
        loaded, load_presets(default_presets_dir()), default_preset="full", prefill_chunk_tokens=prefill_chunk
    )
    result = engine.generate(
        prompt=list(sample.prompt_ids),
        sampling=SamplingParams(max_tokens=sample.max_new_tokens, temperature=0.0),
        kv_policy=policy,
    )
    print(f"answer {result.text!r} ({'correct' if sample.answers[0] in result.text else 'wrong'})")
    return result
