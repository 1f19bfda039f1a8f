"""Which heads copy the needle on an eval task's prompts, next to the model's shipped profile.

`kvmux calibrate` scores heads on needles in natural prose (niah_single_book). This script scores the
same copy-paste events (Retrieval Heads, arXiv 2404.15574; `kvmux.evals.calibrate.probe`) on the
prompts of another `kvmux eval` task, e.g. the filler-haystack passkey, and prints the heads that rank
highest there, whether the profile's top N includes them, and the mean score per head as JSON
(`--out`), so a task a retrieval-head preset misses can be traced to the heads the profile chose.

    python scripts/retrieval_heads_on_task.py --task passkey --length 8192 --depths 10,50,90 --samples 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvmux.cli_args import apply_threads
from kvmux.evals.calibrate.probe import probe_prompt
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies.retrieval_heads import retrieval_head_mask


def value_occurrences(sample, tokenizer) -> list[tuple[int, ...]]:
    """Prompt positions of the value's tokens, for every copy of the value inside the needle (the passkey
    needle states it twice), each copy tokenised alike."""
    start, end = sample.needle_spans[0]
    value = sample.answers[0]
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    found, offset = [], sample.prompt.find(value, start, end)
    while offset >= 0:
        stop = offset + len(value)
        found.append(tuple(i for i, (s, e) in enumerate(enc.offset_mapping) if s < stop and e > offset))
        offset = sample.prompt.find(value, stop, end)
    same = [positions for positions in found if len(positions) == len(found[0])]
    if not same:
        raise ValueError(f"needle value {value!r} not found in its needle")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--depths", default="10,30,50,70,90")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--top", type=int, default=16, help="the profile's top N to compare with")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the per-head scores as JSON")
    args = parser.parse_args()
    apply_threads(args.threads)
    loaded = load_model(ModelSpec(prefill_chunk_tokens=1 << 20))
    info, runner, tokenizer = loaded.info, loaded.runner(), loaded.tokenizer
    task, renderer = get_task(args.task), Renderer(tokenizer)
    total = torch.zeros(info.num_layers, info.num_heads)
    prompts = 0
    for depth in (float(d) for d in args.depths.split(",")):
        for index in range(args.samples):
            sample = task.make(renderer, args.length, depth, index, args.seed, 16)
            occurrences = value_occurrences(sample, tokenizer)
            flat = tuple(p for positions in occurrences for p in positions)
            result = probe_prompt(runner, info, list(sample.prompt_ids), flat, steps=len(occurrences[0]) + 2)
            # a head copies value token i when it reads it from any of the needle's copies of the value
            copied = result.copied.view(*result.copied.shape[:2], len(occurrences), -1).any(-2)
            total += copied.float().mean(-1)
            prompts += 1
            answer = tokenizer.decode(result.generated)
            print(f"depth {depth:g} index {index}: {answer!r} (answer {sample.answers[0]})", flush=True)
    scores = total / max(prompts, 1)
    profile = retrieval_head_mask(info, args.top, "hip")
    order = scores.flatten().argsort(descending=True)
    print(
        f"heads by copy score on {args.task} at {args.length} ({prompts} prompts); * = in the profile's top {args.top}"
    )
    for flat in order[: 2 * args.top].tolist():
        layer, head = divmod(flat, info.num_heads)
        mark = "*" if profile is not None and bool(profile[layer, head]) else " "
        print(f"  {mark} layer {layer:2d} head {head}: {float(scores[layer, head]):.3f}")
    if args.out:
        args.out.write_text(json.dumps({"task": args.task, "length": args.length, "prompts": prompts,
                                        "scores": scores.tolist()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
