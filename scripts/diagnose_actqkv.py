"""Does ActQKV retrieve the passkey's block? Per layer, in the last prompt window and the first decode steps.

Builds the same seeded passkey prompt as `kvmux eval` (task passkey, raw format, seed 42), runs
it through an ActQKV preset (`actqkv` unless --preset) with the question passed as `kv_policy.query`
(or, with --no-query, found in the prompt as a plain request gets it), and records which
blocks every layer selects. Prints the greedy answer, then one digit per layer (1 = a block
holding needle tokens was retrieved) for the last window of the prompt and for the first decode
steps. Separates a retrieval miss from a miss in reading what was retrieved.

    python scripts/diagnose_actqkv.py --length 16384 --depth 90 --index 0
    python scripts/diagnose_actqkv.py --length 16384 --depth 90 --overrides '{"n_local": 1024}'
    python scripts/diagnose_actqkv.py --task passkey_book --preset actqkv_long --no-query --depth 50
"""

from __future__ import annotations

import argparse
import json

import torch
from passkey_case import add_case_arguments, generate, load_case

from kvmux.policies.actqkv.session import ActQKVSession


def hits(records: list[dict]) -> str:
    """One digit per layer (how many of the needle's blocks were retrieved) and the layers that got all."""
    digits = "".join(str(min(9, r["hit"])) for r in records)
    whole = sum(r["hit"] == len(r["needle_blocks"]) > 0 for r in records)
    return f"{digits} (all {len(records[0]['needle_blocks'])} in {whole}/{len(records)} layers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, "actqkv", length=16384, depth=90.0)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=3)
    parser.add_argument("--preset", default="actqkv", help="an ActQKV preset, e.g. actqkv_long")
    parser.add_argument("--no-query", action="store_true", help="send no kv_policy.query (question: auto)")
    parser.add_argument("--all-blocks-layers", default="", help="layers that attend every block, comma list")
    args = parser.parse_args()
    loaded, sample, needle = load_case(args, prefill_chunk=args.prefill_chunk)

    records: list[dict] = []
    original = ActQKVSession._select

    every_block = {int(x) for x in args.all_blocks_layers.split(",") if x}

    def recording_select(self, mem, layer, window_idx, probe_q, decoding):
        chosen = original(self, mem, layer, window_idx, probe_q, decoding)
        if layer in every_block and chosen is not None:
            chosen = torch.arange(mem.num_blocks, device=chosen.device)
        first = mem.init_k.shape[1]
        blocks = {(t - first) // self.params.block_size for t in needle if t >= first}
        blocks = {b for b in blocks if b < mem.num_blocks}
        got = set(chosen.tolist()) if chosen is not None else set()
        records.append(
            {"seen": self.tokens_seen, "layer": layer, "window": window_idx, "decoding": decoding,
             "needle_blocks": sorted(blocks), "hit": len(blocks & got), "chosen": len(got),
             "available": mem.num_blocks}
        )  # fmt: skip
        return chosen

    ActQKVSession._select = recording_select
    policy = {"preset": args.preset, **json.loads(args.overrides)}
    if not args.no_query:
        policy["query"] = sample.query
    generate(loaded, sample, policy, prefill_chunk=args.prefill_chunk)

    layers = loaded.info.num_layers
    prompt = [r for r in records if not r["decoding"]]
    last_forward = max(r["seen"] for r in prompt)
    last_window = max(r["window"] for r in prompt if r["seen"] == last_forward)
    final = sorted(
        (r for r in prompt if r["seen"] == last_forward and r["window"] == last_window), key=lambda r: r["layer"]
    )
    print(f"needle blocks {final[-1]['needle_blocks']} (empty: the needle is still in the local window)")
    print(f"last prompt window: {hits(final)}")
    print(f"blocks chosen per layer (of {final[-1]['available']}): {' '.join(str(r['chosen']) for r in final)}")
    decode = [r for r in records if r["decoding"]]
    for step in range(min(args.decode_steps, len(decode) // layers)):
        row = decode[step * layers : (step + 1) * layers]
        print(f"decode step {step}:      {hits(row)}")


if __name__ == "__main__":
    main()
