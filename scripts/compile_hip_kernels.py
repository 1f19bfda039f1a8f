"""Compile HiP's Triton kernels (arXiv 2406.09827) for NVIDIA GPUs, no GPU needed.

The kernels: HiP's search (`policies/hip/triton_search.py`) and the sparse layer's attention over
its selection (`policies/sparse/triton_attention.py`). Triton's CPU interpreter, which the tests
use, runs the kernels op by op and accepts code that the real compiler rejects (a layout or type
that does not lower, a tile that does not fit). This script runs the real compiler, from Python
source to a cubin, for the launches the policy makes: the search (prefill and decode) and the
attention (prefill and decode), for bf16, fp16 and fp32 inputs, for sm_80 (A100), sm_89 (L4, L40S,
RTX 4090) and sm_90 (H100, H200), at the Llama-3-8B head size (128) and the embedded model's (64).
Where Triton's ptxas is found it also reports registers and spills per thread, which decide how
many programs an SM holds.

    python scripts/compile_hip_kernels.py [--arch 80 89 90] [--head-dims 128 64] [--dtypes bfloat16 ...]
                                          [--json FILE]

Exit status 1 if any variant fails to compile or needs more shared memory than the GPU gives one
program (each failure is printed with its error).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces kernels with Python functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvmux.policies.hip import triton_search  # noqa: E402
from kvmux.policies.sparse import triton_attention  # noqa: E402

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# shared memory one program may use (the opt-in maximum per block), bytes, by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# arguments that are not int32 scalars: tensors (by the kernels' parameter names) and the softmax scale
SEARCH_ARGS = {"Q": "data", "K": "data", "LO": "*i32", "HI": "*i32", "SCRATCH": "*i32", "OUT": "*i32"}
ATTENTION_ARGS = {
    "Q": "data",
    "K": "data",
    "V": "data",
    "SEL": "*i32",
    "NSEL": "*i32",
    "OUT": "data",
    "COUNT": "*i32",
    "TOTALS": "*i64",
    "scale": "fp32",
}


def signature(kernel, arg_types: dict[str, str], dtype: torch.dtype, constants: dict) -> dict[str, str]:
    names = inspect.signature(kernel.fn).parameters
    sig = {}
    for name in names:
        if name in constants:
            sig[name] = "constexpr"
        else:
            kind = arg_types.get(name, "i32")
            sig[name] = POINTER_TYPES[dtype] if kind == "data" else kind
    return sig


def variants(head_dims: list[int], dtypes: list[str]):
    """(label, kernel, argument types, dtype, constants, num_warps) for every launch the policy makes."""
    for d in head_dims:
        for dtype in (DTYPES[name] for name in dtypes):
            name = str(dtype).removeprefix("torch.")
            for phase, block_q, stride in (("prefill", 32, 2), ("decode", 1, 1)):
                constants = triton_search.search_constants(d, block_q, stride, 256, 2, dtype)
                yield (
                    f"search {phase} D{d} {name}",
                    triton_search._search_kernel,
                    SEARCH_ARGS,
                    dtype,
                    constants,
                    triton_search.SEARCH_NUM_WARPS,
                )
                constants = triton_attention.attention_constants(d, block_q, 2, dtype, None, False, has_totals=True)
                yield (
                    f"attention {phase} D{d} {name}",
                    triton_attention._attention_kernel,
                    ATTENTION_ARGS,
                    dtype,
                    constants,
                    triton_attention.ATTENTION_NUM_WARPS,
                )


def ptxas_path(arch: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # another Triton layout: registers are then not reported
        return None


def register_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack from `ptxas -v` on the kernel's PTX (empty if ptxas is missing)."""
    ptxas = ptxas_path(arch)
    if ptxas is None or not os.path.exists(ptxas):
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", handle.name, "-o", os.devnull], capture_output=True)
    finally:
        os.unlink(handle.name)
    text = (done.stdout + done.stderr).decode(errors="replace")
    report = {}
    if found := re.search(r"Used (\d+) registers", text):
        report["registers"] = int(found.group(1))
    if found := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        report["spill_store_bytes"], report["spill_load_bytes"] = int(found.group(1)), int(found.group(2))
    return report


def compile_all(archs: list[int], head_dims: list[int], dtypes: list[str]) -> list[dict]:
    results = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, arg_types, dtype, constants, num_warps in variants(head_dims, dtypes):
            row = {"arch": f"sm_{arch}", "variant": label, "num_warps": num_warps}
            start = time.perf_counter()
            try:
                source = ASTSource(kernel, signature(kernel, arg_types, dtype, constants), constants)
                compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
                row["shared_bytes"] = compiled.metadata.shared
                row.update(register_report(compiled.asm["ptx"], arch))
                limit = SHARED_LIMIT.get(arch)
                row["ok"] = limit is None or row["shared_bytes"] <= limit
                if not row["ok"]:  # compiles, but the launch would fail with "out of resource"
                    row["error"] = f"needs {row['shared_bytes']} bytes of shared memory, sm_{arch} has {limit}"
            except Exception as err:  # report every variant, then fail at the end
                row["ok"] = False
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
            row["seconds"] = round(time.perf_counter() - start, 2)
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90], help="compute capabilities")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], help="head sizes to compile for")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", help="write every variant's result to this file")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}: compiling HiP's kernels for {args.arch}", file=sys.stderr)
    results = compile_all(args.arch, args.head_dims, args.dtypes)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "results": results}, handle, indent=1)
    failed = [row for row in results if not row["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} variants compiled", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
