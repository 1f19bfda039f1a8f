"""Time one decode step's attention over every layer: the folded GQA call against split-KV windows.

Each layer gets its own K/V buffer (so the keys come from memory, not from a cache a repeated call
would warm), a decode row of Hq query heads over the first L slots, as a growable cache layer hands
it to `dense.sdpa`. Prints the median and min over rounds of the time for all layers, for the plain
folded call and for `split_decode` with the parts `split_parts` picks (and any given with --parts),
and checks that the outputs agree.

    python scripts/decode_attention_bench.py --lengths 4096,8192 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvmux.policies.split_decode import split_decode, split_parts


def time_layers(fn, layers: list[tuple[torch.Tensor, torch.Tensor]], rounds: int) -> list[float]:
    for k, v in layers:  # warm-up round
        fn(k, v)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for k, v in layers:
            fn(k, v)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192", help="keys per decode row, comma list")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", default="9,3", help="query heads, KV heads (embedded model: 9,3)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--parts", default="", help="extra split counts to time, comma list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hq, hkv = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers, Hq {hq}, Hkv {hkv}, D {d}")
    print("| keys | call | ms per step (median) | min | max error |")
    print("|---:|---|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        capacity = length + 512  # a growable buffer holds spare slots past the last key
        layers = [
            (torch.randn(1, hkv, capacity, d)[:, :, :length], torch.randn(1, hkv, capacity, d)[:, :, :length])
            for _ in range(args.layers)
        ]
        folded = torch.randn(1, hkv, hq // hkv, d)
        calls = {"folded": lambda k, v, q=folded: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)}
        chosen = split_parts(hkv, length, args.threads)
        extra = [int(x) for x in args.parts.split(",") if x]
        for parts in sorted({chosen, *extra} - {1}):
            calls[f"split {parts}" + (" (chosen)" if parts == chosen else "")] = lambda k, v, q=folded, p=parts: (
                split_decode(q, k, v, d**-0.5, p)
            )
        reference = calls["folded"](*layers[0])
        for name, fn in calls.items():
            error = (fn(*layers[0]) - reference).abs().max().item()
            times = time_layers(fn, layers, args.rounds)
            print(f"| {length} | {name} | {statistics.median(times):.2f} | {min(times):.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
