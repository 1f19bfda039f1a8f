"""Does FlexPrefill keep the passkey's key blocks for the last query block? Per layer and head.

Builds the same seeded passkey prompt as `kvmux eval` (task passkey, raw format, seed 42) and runs
it through the `flexprefill` preset (with optional parameter overrides, and optionally a different
gamma on chosen layers only). For every layer it prints the query heads whose selection leaves
one of the needle's key blocks out of the last query block's row (the row that produces the first
answer token), with the head's pattern, its vertical budget and the rank of the needle's column
by the probe's pooled vertical mass. Separates a selection miss from a miss in reading.

    python scripts/diagnose_flexprefill.py --length 2048 --depth 10 --index 0
    python scripts/diagnose_flexprefill.py --length 2048 --depth 10 --layer-gamma 18=0.97
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies import flexprefill
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "policies"


def vertical_ranks(query: torch.Tensor, key: torch.Tensor, scaling: float, block_size: int) -> torch.Tensor:
    """Rank (0 = first) of every key block by the probe's pooled vertical mass, per query head: [Hq, nkb]."""
    hq, hkv = query.shape[0], key.shape[0]
    rows = min(block_size, query.shape[1])
    g = hq // hkv
    parts = [flexprefill.probe(query[i * g : (i + 1) * g], key[i : i + 1], scaling, rows) for i in range(hkv)]
    probs = torch.cat(parts)
    pooled = flexprefill.block_pool(probs.mean(1)[..., None], block_size)[..., 0]
    return torch.argsort(torch.argsort(pooled, dim=-1, descending=True), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=10.0)
    parser.add_argument("--index", type=int, default=0, help="sample index (as in kvmux eval)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overrides", default="{}", help="JSON parameters for the flexprefill preset")
    parser.add_argument(
        "--layer-gamma", action="append", default=[], metavar="LAYER=GAMMA", help="a different gamma on one layer"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer_gamma = {int(k): float(v) for k, v in (item.split("=") for item in args.layer_gamma)}

    loaded = load_model(ModelSpec(prefill_chunk_tokens=1 << 20))
    sample = get_task("passkey").make(Renderer(loaded.tokenizer), args.length, args.depth, args.index, args.seed, 0)
    needle = sample.needle_token_indices(loaded.tokenizer)
    print(f"prompt {sample.prompt_tokens} tokens, needle tokens {needle[0]}-{needle[-1]}, answer {sample.answers}")

    lines: list[str] = []
    original = flexprefill.FlexPrefillSession.attention

    def recording_attention(self, call):
        gamma, saved = layer_gamma.get(call.layer_idx), self.params
        if gamma is not None:
            self.params = self.params.model_copy(update={"gamma": gamma})
        try:
            if call.query.shape[2] > 1 and not self.is_short(call.key.shape[2]):
                bs = self.params.block_size
                sel = flexprefill.select_blocks(call.query[0], call.key[0], call.scaling, self.params)
                ranks = vertical_ranks(call.query[0], call.key[0], call.scaling, bs)
                needle_blocks = sorted({t // bs for t in needle})
                missing = []
                for head in range(sel.blocks.shape[0]):
                    row = sel.blocks[head, -1]
                    if not all(bool(row[b]) for b in needle_blocks):
                        pattern = "query-aware" if bool(sel.query_aware[head]) else "vertical-slash"
                        rank = min(int(ranks[head, b]) for b in needle_blocks) + 1
                        columns = int(sel.n_vertical[head])
                        missing.append(f"head {head} ({pattern}, {columns} columns, needle column rank {rank})")
                kept = "; ".join(missing) if missing else "all heads keep it"
                lines.append(f"  layer {call.layer_idx:2d}: {kept}")
            return original(self, call)
        finally:
            self.params = saved

    flexprefill.FlexPrefillSession.attention = recording_attention
    engine = Engine(loaded, load_presets(PRESETS), default_preset="full", prefill_chunk_tokens=1 << 20)
    policy = {"preset": "flexprefill", **json.loads(args.overrides)}
    result = engine.generate(
        prompt=list(sample.prompt_ids), sampling=SamplingParams(max_tokens=8, temperature=0.0), kv_policy=policy
    )
    print(f"answer {result.text!r} ({'correct' if sample.answers[0] in result.text else 'wrong'}), kv {result.kv}")
    print("needle's key blocks left out of the last query block's row:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
