"""Does HiP select the passkey's tokens? Per layer and head, for the last query block of the prompt
and the first decode step.

Builds the same seeded passkey prompt as `kvmux eval` (task passkey, raw format, seed 42), runs it
through the `hip` preset (with optional parameter overrides), and records, for every sparse layer,
how many of the needle's tokens each query head's selected key blocks cover in the last query block
(the one that produces the first answer token) and at the first decode step. Separates a search
miss from a miss in reading what was selected.

    python scripts/diagnose_hip.py --length 4096 --depth 90 --index 0
    python scripts/diagnose_hip.py --length 4096 --depth 90 --overrides '{"mask_k": 2048}'
    python scripts/diagnose_hip.py --length 4096 --depth 90 --layer-mask-k 18=2048
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies import hip
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "policies"


def covered_per_head(sel, block_k: int, needle: list[int]) -> list[int]:
    """Needle tokens inside the selected blocks of the last query block, per query head."""
    blocks, valid = sel.blocks[0, :, -1], sel.valid[0, :, -1]
    counts = []
    for head in range(blocks.shape[0]):
        chosen = {b for b, ok in zip(blocks[head].tolist(), valid[head].tolist(), strict=True) if ok}
        counts.append(sum(t // block_k in chosen for t in needle))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depth", type=float, default=90.0)
    parser.add_argument("--index", type=int, default=0, help="sample index (as in kvmux eval)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--overrides", default="{}", help="JSON parameters for the hip preset")
    parser.add_argument(
        "--layer-mask-k", action="append", default=[], metavar="LAYER=K", help="a different mask_k on one layer"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer_mask_k = {int(k): int(v) for k, v in (item.split("=") for item in args.layer_mask_k)}

    loaded = load_model(ModelSpec(prefill_chunk_tokens=1 << 20))
    sample = get_task("passkey").make(Renderer(loaded.tokenizer), args.length, args.depth, args.index, args.seed, 0)
    needle = sample.needle_token_indices(loaded.tokenizer)
    print(f"prompt {sample.prompt_tokens} tokens, needle tokens {needle[0]}-{needle[-1]}, answer {sample.answers}")

    records: list[tuple[int, bool, list[int]]] = []
    original = hip.HipSession.select

    def recording_select(self, call, geo, block_stride):
        sel = original(self, call, geo, block_stride)
        records.append(
            (call.layer_idx, call.query.shape[2] == 1, covered_per_head(sel, self.params.block_size_k, needle))
        )
        return sel

    original_attention = hip.HipSession.attention

    def attention_with_layer_k(self, call):
        saved = self.params
        if call.layer_idx in layer_mask_k:
            self.params = self.params.model_copy(update={"mask_k": layer_mask_k[call.layer_idx]})
        try:
            return original_attention(self, call)
        finally:
            self.params = saved

    hip.HipSession.select = recording_select
    hip.HipSession.attention = attention_with_layer_k
    engine = Engine(loaded, load_presets(PRESETS), default_preset="full", prefill_chunk_tokens=1 << 20)
    policy = {"preset": "hip", **json.loads(args.overrides)}
    result = engine.generate(
        prompt=list(sample.prompt_ids), sampling=SamplingParams(max_tokens=8, temperature=0.0), kv_policy=policy
    )
    print(f"answer {result.text!r} ({'correct' if sample.answers[0] in result.text else 'wrong'})")
    print(f"needle tokens covered per query head (of {len(needle)}):")
    seen: set[tuple[int, bool]] = set()
    for layer, decoding, counts in records:
        if (layer, decoding) in seen:  # later decode refreshes: only the first is printed
            continue
        seen.add((layer, decoding))
        print(f"  layer {layer:2d} {'first decode' if decoding else 'last prompt block'}: {counts}")


if __name__ == "__main__":
    main()
