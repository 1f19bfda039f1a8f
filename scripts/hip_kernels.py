"""HiP's attention kernels (arXiv 2406.09827) on CUDA: one attention layer against dense SDPA.

One layer shaped like Llama-3-8B (32 query heads, 8 KV heads, head dim 128, bf16, random inputs):
a decode step at 128K context (the mean of `refresh_interval` steps, one of which re-searches) and
a 64K-token prefill, for the PyTorch kernels (gather and table scoring) and the Triton kernels,
after an 8K check that the two kernel families agree; then each Triton kernel alone under a few
launch settings. Prints the figures as JSON.

    python scripts/hip_kernels.py              (on a GPU; also run by scripts/gpu_targets.sh)
    python scripts/hip_kernels.py --dry-run    (the same code on CPU at toy sizes, Triton interpreted)

Attention-level timing of random inputs is below what `kvmux bench` measures (whole models,
prompts, generation); the model-level speed of `hip` is `kvmux bench --presets full,hip ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from kvmux.evals.bench.probes import device_time

VARIANTS = {  # name -> HiP parameters besides the defaults: PyTorch kernels (two scorings) and Triton
    "gather": {"score_mode": "gather", "kernel": "fast"},
    "table": {"score_mode": "table", "kernel": "fast"},
    "triton": {"kernel": "triton"},
}


# Triton launch settings timed kernel by kernel: (candidates scored per step, warps) for the search,
# (keys per step, warps) for the attention; the policy's defaults: search (64, 8) for prefill and
# (256, 8) for decode, attention (64, 4)
SEARCH_LAUNCHES = ((64, 8), (256, 8), (32, 4), (64, 4), (512, 8))
ATTENTION_LAUNCHES = ((64, 4), (32, 4), (64, 8))


def measure_cuda(
    decode_context: int = 131072,
    prefill_tokens: int = 65536,
    reps: int = 5,
    dry_run: bool = False,
    results: dict | None = None,
) -> dict:
    """Llama-3-8B-shaped attention (Hq 32, Hkv 8, D 128, bf16, random): HiP vs dense SDPA, seconds.

    Every variant runs through the policy's own attention call (search + sparse attention), after a
    check at 8K that the Triton kernels agree with the PyTorch ones on the same inputs. `dry_run`: the
    same code on CPU at toy sizes (4/2 heads, fp32, Triton's interpreter), to check the script itself.
    Figures go into `results` as they come, so a caller keeps them if the run is interrupted.
    """
    import torch.nn.functional as F

    from kvmux.models.info import ModelInfo
    from kvmux.policies.base import AttentionCall, SessionRequest
    from kvmux.policies.hip.policy import HipParams, HipPolicy

    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, scale = 32, 8, 128, 128**-0.5
    agree, base = 8192, {}
    if dry_run:  # small enough for the interpreter: K_b 32, budget 144
        dev, dt, hq, hkv, agree = torch.device("cpu"), torch.float32, 4, 2, 1024
        base = {"mask_k": 64, "window": 64}
    torch.manual_seed(0)

    info = ModelInfo(
        config=None, served_name="llama3-8b-shape", root="random", num_layers=32, num_heads=hq, num_kv_heads=hkv,
        head_dim=d, max_context=decode_context, dtype=dt, device=dev, inv_freq=torch.ones(d // 2), rope_scaling=1.0,
    )  # fmt: skip

    def session(name: str):
        params = HipParams(dense_layers=0, **base, **VARIANTS[name])
        return params, HipPolicy().new_session(params, info, SessionRequest())

    results = {} if results is None else results
    results["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"

    def record(key: str, measure) -> None:
        """Store one figure (or the error that prevented it) and show it at once on stderr."""
        try:
            results[key] = measure()
        except Exception as err:  # a kernel that fails to compile or run must not cost the other figures
            results[key] = f"error: {type(err).__name__}: {err}"
        print(f"[hip] {key} = {results[key]}", file=sys.stderr, flush=True)

    # agreement at 8K: the same inputs through the PyTorch and the Triton search and attention
    q, k, v = (torch.randn(1, h, agree, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    call = AttentionCall(5, q, k, v, None, scale)

    def same_blocks() -> float:
        from kvmux.policies.hip import triton_search as hip_triton
        from kvmux.policies.hip.search import hip_search
        from kvmux.policies.sparse.selection import SparseGeometry

        p = session("table")[0]
        geo = SparseGeometry.build(agree, agree, p.block_size_q, p.block_size_k, p.sink_tokens, p.window, 0, dev)
        groups = p.mask_k // p.block_size_k
        want = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, groups, p.block_size_k, p.block_stride_q, "table")
        got = hip_triton.search(q, k, geo, groups, p.block_stride_q)
        width = agree // p.block_size_k + 1

        def as_map(sel):
            return torch.zeros(*sel.blocks.shape[:-1], width, dtype=torch.bool, device=dev).scatter_(
                -1, sel.blocks, sel.valid
            )

        want_map, got_map = as_map(want), as_map(got)
        return float((want_map & got_map).sum() / want_map.sum().clamp(min=1))

    def outputs_agree() -> dict:
        fast, triton_out = session("table")[1].attention(call).float(), session("triton")[1].attention(call).float()
        cosine = F.cosine_similarity(fast.flatten(), triton_out.flatten(), 0)
        return {"max_abs_diff": float((fast - triton_out).abs().max()), "cosine": float(cosine)}

    def kernel_figures(phase: str, q, k, v) -> None:
        """The two Triton kernels alone, under the launch settings that trade registers for occupancy."""
        from kvmux.policies.hip import triton_search as hip_triton
        from kvmux.policies.sparse import triton_attention as sparse_triton
        from kvmux.policies.sparse.selection import SparseGeometry

        p = session("triton")[0]
        block_q, stride = (p.block_size_q, p.block_stride_q) if q.shape[2] > 1 else (1, 1)
        geo = SparseGeometry.build(q.shape[2], k.shape[2], block_q, p.block_size_k, p.sink_tokens, p.window, 0, dev)
        groups = p.mask_k // p.block_size_k
        if not hip_triton.usable_groups(groups):
            return
        for chunk, warps in SEARCH_LAUNCHES:
            record(
                f"{phase}_triton_search_chunk{chunk}_warps{warps}_s",
                lambda chunk=chunk, warps=warps: device_time(
                    lambda: hip_triton.search(q, k, geo, groups, stride, score_chunk=chunk, num_warps=warps), reps
                ),
            )
        packed = sparse_triton.pack(hip_triton.search(q, k, geo, groups, stride))
        for block_n, warps in ATTENTION_LAUNCHES:
            record(
                f"{phase}_triton_attention_block{block_n}_warps{warps}_s",
                lambda block_n=block_n, warps=warps: device_time(
                    lambda: sparse_triton.attention(
                        q,
                        k,
                        v,
                        packed,
                        block_q=block_q,
                        block_k=p.block_size_k,
                        sinks=p.sink_tokens,
                        window=p.window,
                        scaling=scale,
                        block_n=block_n,
                        num_warps=warps,
                    ),  # fmt: skip
                    reps,
                ),
            )

    record("agreement_selected_blocks_shared", same_blocks)
    record("agreement_outputs", outputs_agree)
    del q, k, v, call

    k = torch.randn(1, hkv, decode_context, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(1, hq, 1, d, device=dev, dtype=dt)
    record(
        "decode_dense_s", lambda: device_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    )
    for name in VARIANTS:
        params, sess = session(name)
        call = AttentionCall(5, q, k, v, None, scale)

        def steps(sess=sess, call=call, n=params.effective_refresh):
            for _ in range(n):
                sess.attention(call)

        record(f"decode_hip_{name}_s", lambda steps=steps, n=params.effective_refresh: device_time(steps, reps) / n)
    kernel_figures("decode", q, k, v)
    del k, v
    k = torch.randn(1, hkv, prefill_tokens, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(1, hq, prefill_tokens, d, device=dev, dtype=dt)
    record(
        "prefill_dense_s",
        lambda: device_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps),
    )
    for name in VARIANTS:
        call = AttentionCall(5, q, k, v, None, scale)
        sess = session(name)[1]
        record(f"prefill_hip_{name}_s", lambda call=call, sess=sess: device_time(lambda: sess.attention(call), 2))
    kernel_figures("prefill", q, k, v)
    for phase in ("decode", "prefill"):
        for name in VARIANTS:
            dense, hip_s = results[f"{phase}_dense_s"], results[f"{phase}_hip_{name}_s"]
            if isinstance(dense, float) and isinstance(hip_s, float):
                results[f"{phase}_speedup_{name}"] = dense / hip_s
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run the code on CPU at toy sizes")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        out = measure_cuda(decode_context=2048, prefill_tokens=512, reps=1, dry_run=True)
    else:
        out = {}
        try:
            measure_cuda(results=out)
        except KeyboardInterrupt:  # a time limit: keep the figures measured so far
            out["interrupted"] = True
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
