"""Measure FlexPrefill (arXiv 2502.20766) against full attention.

CPU (default): the embedded model, passkey prompts of a target token length. For every sample
both policies prefill the same prompt in the same process, interleaved; prefill wall time (end
to end, model forward included), achieved density, and passkey accuracy (greedy, 10 tokens,
first integer = key) are reported, with medians over samples.

    python scripts/measure_flexprefill.py --tokens 8192 --samples 5 --json out.json

CUDA (`--cuda`): attention only, Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128),
bf16, random q/k/v at 64K and 128K tokens. Times dense causal SDPA, the FlexPrefill selection,
the block-sparse flex kernel on that selection, and the kernel alone at fixed densities (random
inputs give input-dependent attention, near-uniform for N(0, 1) q/k, so fixed densities are the
fair kernel comparison; see the FlexPrefill issue tracker, #1/#2). Needs the repository on the
import path as `kvmux` (e.g. `pip install -e . --no-deps`).

    python scripts/measure_flexprefill.py --cuda --lengths 65536 131072 --json cuda.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time

import torch

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def passkey_ids(tokenizer, tokens: int, depth: float, seed: int) -> tuple[torch.Tensor, str]:
    """Passkey prompt (landmark-attention wording) filled with garbage to about `tokens` tokens."""
    key = str(random.Random(seed).randint(1, 50000))
    line = f"The pass key is {key}. Remember it. {key} is the pass key."
    fixed = len(tokenizer(f"{TASK}\n\n{line}\n\n{QUESTION}").input_ids)
    per = len(tokenizer(" " + GARBAGE).input_ids)
    n = max(0, (tokens - fixed) // per)
    cut = int(n * depth)
    text = "\n".join([TASK, " ".join([GARBAGE] * cut), line, " ".join([GARBAGE] * (n - cut)), QUESTION])
    return torch.tensor([tokenizer(text).input_ids]), key


def run_one(loaded, runner, policy: str, params: dict, ids: torch.Tensor, new_tokens: int = 10):
    from kvmux.policies.base import SessionRequest
    from kvmux.policies.registry import get_policy

    pol = get_policy(policy)
    session = pol.new_session(pol.Params(**params), loaded.info, SessionRequest())
    start = time.perf_counter()
    gen = session.prefill(runner, ids)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            logits = stop.value
            break
    prefill_s = time.perf_counter() - start
    out = []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        out.append(token)
        logits = session.decode(runner, token)
    text = loaded.tokenizer.decode(out)
    stats = session.stats().as_dict()
    session.close()
    return prefill_s, text, stats


def measure_cpu(args) -> dict:
    from kvmux.models.loader import ModelSpec, load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec())
    runner = loaded.runner()
    params = json.loads(args.params)
    # compile the block-sparse kernel outside the timings (one graph serves every length)
    warm_ids, _ = passkey_ids(loaded.tokenizer, min(args.tokens, 2048), 0.5, seed=12345)
    run_one(loaded, runner, "flexprefill", dict(params, min_budget=256), warm_ids, new_tokens=1)
    rows = []
    for i in range(args.samples):
        depth = (i + 0.5) / args.samples
        ids, key = passkey_ids(loaded.tokenizer, args.tokens, depth, seed=i)
        row = {"sample": i, "depth": round(depth, 3), "tokens": ids.shape[1], "key": key}
        order = [("full", {}), ("flexprefill", params)]
        for name, p in order if i % 2 == 0 else reversed(order):
            secs, text, stats = run_one(loaded, runner, name, p, ids)
            found = re.search(r"\d+", text)
            row[name] = {"prefill_s": round(secs, 3), "correct": bool(found and found.group() == key), "output": text}
            if name == "flexprefill":
                row[name]["kv"] = stats
        print(json.dumps(row), flush=True)
        rows.append(row)

    def med(name):
        return statistics.median(r[name]["prefill_s"] for r in rows)

    summary = {
        "tokens": args.tokens,
        "threads": args.threads,
        "params": params,
        "full_prefill_s": round(med("full"), 3),
        "flexprefill_prefill_s": round(med("flexprefill"), 3),
        "speedup": round(med("full") / med("flexprefill"), 3),
        "density": round(statistics.mean(r["flexprefill"]["kv"]["density"] for r in rows), 4),
        "full_passkey": sum(r["full"]["correct"] for r in rows) / len(rows),
        "flexprefill_passkey": sum(r["flexprefill"]["correct"] for r in rows) / len(rows),
    }
    return {"summary": summary, "rows": rows}


def cuda_time(fn, reps: int = 5) -> float:
    """Median milliseconds of fn() on the current CUDA device (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    row["dense_sdpa_ms"] = cuda_time(lambda: F.scaled_dot_product_attention(q, *dense_kv, is_causal=True))
    dense_kv = None
    sel = select_blocks(q[0], k[0], scale, params)
    blocks = normalize_blocks(sel.blocks[None], 1, heads, n, n, bs)
    row["density"] = blocks.sum().item() / causal_cells
    row["query_aware_heads"] = int(sel.query_aware.sum())
    row["selection_ms"] = cuda_time(lambda: select_blocks(q[0], k[0], scale, params))
    row["sparse_kernel_ms"] = cuda_time(lambda: block_sparse_attention(q, k, v, blocks, bs, scale, "flex"))
    row["flexprefill_ms"] = row["selection_ms"] + row["sparse_kernel_ms"]
    row["speedup"] = row["dense_sdpa_ms"] / row["flexprefill_ms"]
    nb = -(-n // bs)
    for d in densities:
        fixed = (torch.rand(1, heads, nb, nb, device=q.device) < d) | (torch.arange(nb, device=q.device) == 0)
        row[f"kernel_ms_at_{d}"] = cuda_time(lambda f=fixed: block_sparse_attention(q, k, v, f, bs, scale, "flex"))
        row[f"kernel_density_{d}"] = normalize_blocks(fixed, 1, heads, n, n, bs).sum().item() / causal_cells
    return {key: round(val, 4) if isinstance(val, float) else val for key, val in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    ap.add_argument("--params", default="{}", help="FlexPrefill parameters as JSON")
    ap.add_argument("--cuda", action="store_true", help="time Llama-3-8B-shaped attention on CUDA instead")
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    result = {"cuda": measure_cuda(args.lengths)} if args.cuda else measure_cpu(args)
    if "summary" in result:
        print(json.dumps(result["summary"], indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
