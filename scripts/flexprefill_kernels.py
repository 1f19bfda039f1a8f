"""FlexPrefill's block-sparse attention (arXiv 2502.20766) on CUDA, against dense causal SDPA.

Attention only, Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128), bf16, random q/k/v
at 64K and 128K tokens. Times dense causal SDPA, the FlexPrefill selection, the block-sparse flex
kernel on that selection, and the kernel alone at fixed densities (random inputs give
input-dependent attention, near-uniform for N(0, 1) q/k, so fixed densities are the fair kernel
comparison; see the FlexPrefill issue tracker, #1/#2). Prints one JSON line per input.

    python scripts/flexprefill_kernels.py --lengths 64K,128K --json cuda.json   (also run by scripts/gpu_targets.sh)

Attention-level timing of random inputs is below what `kvmux bench` measures (whole models,
prompts, generation); the model-level speed of `flexprefill` is `kvmux bench --presets
full,flexprefill ...`.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvmux.cli_args import token_counts
from kvmux.evals.bench.probes import device_time


def device_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of fn() on the current CUDA device (after one warm-up call)."""
    return 1000 * device_time(fn, reps)


def measure_cuda(lengths, densities=(0.1, 0.25, 0.5), heads=32, kv_heads=8, head_dim=128, seed=0) -> list[dict]:
    """Llama-3-8B-shaped attention in bf16: dense SDPA vs FlexPrefill (selection + flex kernel).

    Two inputs per length: `random` (q, k ~ N(0, 1): near-uniform attention, so FlexPrefill keeps
    almost everything, its worst case) and `peaked` (q scaled by 4: each query attends to a few
    keys, closer to the concentrated attention of real long prompts).
    """
    torch.manual_seed(seed)
    results = []
    for n in lengths:
        for kind, q_scale in (("random", 1.0), ("peaked", 4.0)):
            q = torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16) * q_scale
            k = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=torch.bfloat16)
            row = {"input": kind, **time_length(q, k, v, densities if kind == "random" else ())}
            print(json.dumps(row), flush=True)
            results.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    return results


def time_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, densities) -> dict:
    import torch.nn.functional as F

    from kvmux.policies.flexprefill import FlexPrefillParams, select_blocks
    from kvmux.policies.sparse import block_sparse_attention, causal_blocks, normalize_blocks

    params = FlexPrefillParams()
    heads, n, head_dim = q.shape[1], q.shape[2], q.shape[3]
    groups = heads // k.shape[1]
    bs, scale = params.block_size, head_dim**-0.5
    causal_cells = causal_blocks(n, n, bs).sum().item() * heads
    row = {"tokens": n, "device": torch.cuda.get_device_name()}
    # K/V repeated for the dense baseline so that SDPA takes its flash kernel (not a GQA fallback)
    dense_kv = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
    row["dense_sdpa_ms"] = device_ms(lambda: F.scaled_dot_product_attention(q, *dense_kv, is_causal=True))
    dense_kv = None
    sel = select_blocks(q[0], k[0], scale, params)
    blocks = normalize_blocks(sel.blocks[None], 1, heads, n, n, bs)
    row["density"] = blocks.sum().item() / causal_cells
    row["query_aware_heads"] = int(sel.query_aware.sum())
    row["selection_ms"] = device_ms(lambda: select_blocks(q[0], k[0], scale, params))
    row["sparse_kernel_ms"] = device_ms(lambda: block_sparse_attention(q, k, v, blocks, bs, scale, "flex"))
    row["flexprefill_ms"] = row["selection_ms"] + row["sparse_kernel_ms"]
    row["speedup"] = row["dense_sdpa_ms"] / row["flexprefill_ms"]
    nb = -(-n // bs)
    for d in densities:
        fixed = (torch.rand(1, heads, nb, nb, device=q.device) < d) | (torch.arange(nb, device=q.device) == 0)
        row[f"kernel_ms_at_{d}"] = device_ms(lambda f=fixed: block_sparse_attention(q, k, v, f, bs, scale, "flex"))
        row[f"kernel_density_{d}"] = normalize_blocks(fixed, 1, heads, n, n, bs).sum().item() / causal_cells
    return {key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=token_counts, default=[65536, 131072], help="tokens, e.g. 64K,128K")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    result = {"cuda": measure_cuda(args.lengths)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
