"""Which heads does HiP's sparse attention hurt? A first-order, per-head answer on passkey prompts.

The gains are those of `kvmux calibrate --gates` (`kvmux.evals.calibrate.gates`: DuoAttention's head
gate, sparse + g * (dense - sparse), as one gradient at g = 0 for the first token of `full`'s correct
answer), here on any eval task's prompts, printing per prompt the first tokens under `full` and under
the preset, the heads that would help most, and (`--out`) the gains per head as JSON.

    python scripts/head_sensitivity.py --task passkey --length 8192 --depths 70 --samples 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from diagnose_hip import add_dense_heads_argument, apply_dense_heads

from kvmux.cli_args import apply_threads, default_presets_dir
from kvmux.evals.calibrate.gates import gate_gains, top_gains
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams


def first_answer_token(loaded, presets, sample) -> tuple[int, str] | None:
    """The first greedy token of `full` on the prompt and its three likeliest first tokens (None if
    `full` misses the passkey)."""
    engine = Engine(loaded, presets, default_preset="full", prefill_chunk_tokens=1 << 20)
    result = engine.generate(
        prompt=list(sample.prompt_ids),
        sampling=SamplingParams(max_tokens=8, temperature=0.0, logprobs=3),
        kv_policy={"preset": "full"},
    )
    if sample.answers[0] not in result.text:
        return None
    return result.token_ids[0], top_tokens(loaded.tokenizer, result.logprobs[0][2])


def top_tokens(tokenizer, alternatives: list[tuple[int, float]]) -> str:
    return ", ".join(f"{tokenizer.decode([token])!r} {math.exp(logprob):.3f}" for token, logprob in alternatives)


def head_gains(loaded, presets, sample, answer: int, preset: str) -> tuple[torch.Tensor, float, str]:
    """-dNLL/dg per (layer, head), the first answer token's NLL under the preset and its three likeliest
    first tokens."""
    found = gate_gains(loaded.runner(), loaded.info, presets[preset], list(sample.prompt_ids), [answer])
    return found.gains, found.nll, top_tokens(loaded.tokenizer, [(t, math.log(p)) for t, p in found.top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--depths", default="10,30,50,70,90")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--first-sample", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--preset", default="hip_rh")
    parser.add_argument("--top", type=int, default=16)
    add_dense_heads_argument(parser)
    parser.add_argument(
        "--show",
        action="append",
        default=[],
        type=lambda s: tuple(map(int, s.split("/"))),
        metavar="LAYER/HEAD",
        help="also print this head's gain and rank",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    apply_threads(args.threads)
    loaded = load_model(ModelSpec(prefill_chunk_tokens=1 << 20))
    presets = load_presets(default_presets_dir())
    apply_dense_heads(args)
    task, renderer = get_task(args.task), Renderer(loaded.tokenizer)
    total, count, rows = torch.zeros(loaded.info.num_layers, loaded.info.num_heads), 0, []
    for depth in (float(d) for d in args.depths.split(",")):
        for index in range(args.first_sample, args.first_sample + args.samples):
            sample = task.make(renderer, args.length, depth, index, args.seed, 0)
            first = first_answer_token(loaded, presets, sample)
            if first is None:
                print(f"depth {depth:g} sample {index}: full misses it, skipped", flush=True)
                continue
            answer, full_tops = first
            gains, nll, tops = head_gains(loaded, presets, sample, answer, args.preset)
            total += gains
            count += 1
            heads = [f"{layer}/{head} {gain:.3f}" for layer, head, gain in top_gains(gains, 8)]
            print(f"depth {depth:g} sample {index}: first token under full: {full_tops}", flush=True)
            print(f"  under {args.preset}: {tops}; NLL {nll:.3f}; best heads {', '.join(heads)}", flush=True)
            rows.append({"depth": depth, "index": index, "nll": nll, "gains": gains.tolist()})
            if args.out:  # after every prompt, so a run cut short keeps what it measured
                args.out.write_text(json.dumps({"prompts": rows, "mean": (total / count).tolist()}))
    mean = total / max(count, 1)
    for layer, head in args.show:
        rank = int((mean.flatten() > mean[layer, head]).sum()) + 1
        print(f"layer {layer} head {head}: gain {mean[layer, head]:.4f}, rank {rank} of {mean.numel()}")
    print(f"mean over {count} prompts, best {args.top}:")
    for layer, head, gain in top_gains(mean, args.top):
        print(f"  layer {layer:2d} head {head}: {gain:.4f}")


if __name__ == "__main__":
    main()
