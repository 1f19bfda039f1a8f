"""Does ActQKV retrieve the passkey's block? Per layer, in the last prompt window and the first decode steps.

Builds the same seeded passkey prompt as `kvmux eval` (task passkey, raw format, seed 42), runs
it through the `actqkv` preset with the question passed as `kv_policy.query`, and records which
blocks every layer selects. Prints the greedy answer, then one digit per layer (1 = a block
holding needle tokens was retrieved) for the last window of the prompt and for the first decode
steps. Separates a retrieval miss from a miss in reading what was retrieved.

    python scripts/diagnose_actqkv.py --length 16384 --depth 90 --index 0
    python scripts/diagnose_actqkv.py --length 16384 --depth 90 --overrides '{"n_local": 1024}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies import actqkv
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "policies"


def hits(records: list[dict]) -> str:
    """One digit per layer (1 = a needle block retrieved) and the count."""
    return f"{''.join('1' if r['hit'] else '0' for r in records)} ({sum(r['hit'] for r in records)}/{len(records)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depth", type=float, default=90.0)
    parser.add_argument("--index", type=int, default=0, help="sample index (as in kvmux eval)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overrides", default="{}", help="JSON parameters for the actqkv preset")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decode-steps", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(ModelSpec(prefill_chunk_tokens=args.prefill_chunk))
    sample = get_task("passkey").make(Renderer(loaded.tokenizer), args.length, args.depth, args.index, args.seed, 0)
    needle = sample.needle_token_indices(loaded.tokenizer)
    print(f"prompt {sample.prompt_tokens} tokens, needle tokens {needle[0]}-{needle[-1]}, answer {sample.answers}")

    records: list[dict] = []
    original = actqkv.ActQKVSession._select

    def recording_select(self, mem, layer, window_idx, probe_q, decoding):
        chosen = original(self, mem, layer, window_idx, probe_q, decoding)
        first = mem.init_k.shape[1]
        blocks = {(t - first) // self.params.block_size for t in needle if t >= first}
        blocks = {b for b in blocks if b < mem.num_blocks}
        got = set(chosen.tolist()) if chosen is not None else set()
        records.append(
            {"seen": self.tokens_seen, "layer": layer, "window": window_idx, "decoding": decoding,
             "needle_blocks": sorted(blocks), "hit": bool(blocks & got)}
        )  # fmt: skip
        return chosen

    actqkv.ActQKVSession._select = recording_select
    engine = Engine(loaded, load_presets(PRESETS), default_preset="full", prefill_chunk_tokens=args.prefill_chunk)
    policy = {"preset": "actqkv", "query": sample.query, **json.loads(args.overrides)}
    result = engine.generate(
        prompt=list(sample.prompt_ids), sampling=SamplingParams(max_tokens=8, temperature=0.0), kv_policy=policy
    )
    print(f"answer {result.text!r} ({'correct' if sample.answers[0] in result.text else 'wrong'})")

    layers = loaded.info.num_layers
    prompt = [r for r in records if not r["decoding"]]
    last_forward = max(r["seen"] for r in prompt)
    last_window = max(r["window"] for r in prompt if r["seen"] == last_forward)
    final = sorted(
        (r for r in prompt if r["seen"] == last_forward and r["window"] == last_window), key=lambda r: r["layer"]
    )
    print(f"needle blocks {final[-1]['needle_blocks']} (empty: the needle is still in the local window)")
    print(f"last prompt window: {hits(final)}")
    decode = [r for r in records if r["decoding"]]
    for step in range(min(args.decode_steps, len(decode) // layers)):
        row = decode[step * layers : (step + 1) * layers]
        print(f"decode step {step}:      {hits(row)}")


if __name__ == "__main__":
    main()
