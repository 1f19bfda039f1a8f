"""Measure HiP (arXiv 2406.09827) against full attention.

CPU, embedded model (`python scripts/measure_hip.py cpu`): passkey retrieval at 4K and 8K tokens,
prefill time and decode step time (medians over the passkey samples), full vs hip.

CUDA (`python scripts/measure_hip.py cuda`): one attention layer shaped like Llama-3-8B (32 query
heads, 8 KV heads, head dim 128, bf16, random inputs): a decode step at 128K context (the mean of
`refresh_interval` steps, one of which re-searches) and a 64K-token prefill, against dense SDPA.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, num_tokens: int, depth: float, passkey: int) -> torch.Tensor:
    """A passkey prompt of about `num_tokens` tokens with the key at relative `depth`: ids [1, T]."""
    head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    unit = len(tokenizer.encode(FILLER))
    fixed = len(tokenizer.encode(head + needle + tail))
    repeats = max(1, (num_tokens - fixed) // unit)
    before = int(repeats * depth)
    text = head + FILLER * before + needle + FILLER * (repeats - before) + tail
    return torch.tensor([tokenizer.encode(text)])


def run_sample(loaded, policy: str, params: dict, ids: torch.Tensor, max_new: int) -> dict:
    """Prefill, then greedy decode; returns the text, prefill seconds and per-step decode seconds."""
    from kvmux.policies.base import SessionRequest
    from kvmux.policies.registry import get_policy

    pol = get_policy(policy)
    session = pol.new_session(pol.Params(**params), loaded.info, SessionRequest())
    runner = loaded.runner(2048)
    start = time.perf_counter()
    gen = session.prefill(runner, ids)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            logits = stop.value
            break
    prefill_s = time.perf_counter() - start
    tokens, steps = [], []
    for _ in range(max_new):
        token = int(logits.argmax())
        tokens.append(token)
        start = time.perf_counter()
        logits = session.decode(runner, token)
        steps.append(time.perf_counter() - start)
    stats = session.stats().as_dict()
    session.close()
    return {"text": loaded.tokenizer.decode(tokens), "prefill_s": prefill_s, "decode_s": steps, "stats": stats}


def measure_cpu(lengths: list[int], samples: int, max_new: int, threads: int) -> dict:
    from kvmux.models.loader import ModelSpec, load_model

    torch.set_num_threads(threads)
    loaded = load_model(ModelSpec())
    rng = random.Random(0)
    results: dict = {}
    for length in lengths:
        cases = [(rng.randint(10000, 99999), (i + 0.5) / samples) for i in range(samples)]
        for policy in ("full", "hip"):
            rows = []
            for passkey, depth in cases:
                ids = passkey_prompt(loaded.tokenizer, length, depth, passkey)
                out = run_sample(loaded, policy, {}, ids, max_new)
                out["correct"] = str(passkey) in out["text"]
                out["tokens"] = ids.shape[1]
                rows.append(out)
                print(policy, length, depth, out["correct"], repr(out["text"]), round(out["prefill_s"], 2), flush=True)
            results[f"{policy}@{length}"] = {
                "passkey_accuracy": sum(r["correct"] for r in rows) / len(rows),
                "prefill_s_median": statistics.median(r["prefill_s"] for r in rows),
                "decode_step_s_median": statistics.median(s for r in rows for s in r["decode_s"][1:]),
                "tokens": [r["tokens"] for r in rows],
                "stats": rows[-1]["stats"],
            }
            print(json.dumps({f"{policy}@{length}": results[f"{policy}@{length}"]}), flush=True)
    return results


def _cuda_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def measure_cuda(decode_context: int = 131072, prefill_tokens: int = 65536, reps: int = 5) -> dict:
    """Llama-3-8B-shaped attention (Hq 32, Hkv 8, D 128, bf16, random): HiP vs dense SDPA, seconds."""
    import torch.nn.functional as F

    from kvmux.models.runner import ModelInfo
    from kvmux.policies.base import AttentionCall, SessionRequest
    from kvmux.policies.hip import HipParams, HipPolicy
    from kvmux.policies.hip_search import SparseGeometry, hip_search

    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, scale = 32, 8, 128, 128**-0.5
    torch.manual_seed(0)

    info = ModelInfo(
        config=None, served_name="llama3-8b-shape", root="random", num_layers=32, num_heads=hq, num_kv_heads=hkv,
        head_dim=d, max_context=decode_context, dtype=dt, device=dev, inv_freq=torch.ones(d // 2), rope_scaling=1.0,
    )  # fmt: skip
    results: dict = {"device": torch.cuda.get_device_name()}
    k = torch.randn(1, hkv, decode_context, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(1, hq, 1, d, device=dev, dtype=dt)
    results["decode_dense_s"] = _cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    for mode in ("gather", "table"):
        params = HipParams(dense_layers=0, score_mode=mode)
        session = HipPolicy().new_session(params, info, SessionRequest())
        call = AttentionCall(5, q, k, v, None, scale)

        def steps(session=session, call=call, n=params.effective_refresh):
            for _ in range(n):
                session.attention(call)

        results[f"decode_hip_{mode}_s"] = _cuda_time(steps, reps) / params.effective_refresh
    del k, v
    k = torch.randn(1, hkv, prefill_tokens, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(1, hq, prefill_tokens, d, device=dev, dtype=dt)
    results["prefill_dense_s"] = _cuda_time(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps
    )
    from kvmux.policies.hip import sparse_attention

    for mode in ("gather", "table"):
        p = HipParams(dense_layers=0, score_mode=mode)

        def prefill(p=p):
            geo = SparseGeometry.build(prefill_tokens, prefill_tokens, p.block_size_q, p.block_size_k,
                                       p.sink_tokens, p.window, 0, dev)  # fmt: skip
            sel = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, p.mask_k // p.block_size_k,
                             p.block_size_k, p.block_stride_q, p.score_mode)  # fmt: skip
            return sparse_attention(q, k, v, sel, geo, scale)

        results[f"prefill_hip_{mode}_s"] = _cuda_time(prefill, max(1, reps // 2))
    for phase in ("decode", "prefill"):
        best = min(results[f"{phase}_hip_gather_s"], results[f"{phase}_hip_table_s"])
        results[f"{phase}_speedup"] = results[f"{phase}_dense_s"] / best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.target == "cpu":
        out = measure_cpu(args.lengths, args.samples, args.max_new, args.threads)
    else:
        out = measure_cuda()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
