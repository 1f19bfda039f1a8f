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
    python scripts/diagnose_hip.py --length 8192 --depth 70 --dense-heads 16=0,1,2
    python scripts/diagnose_hip.py --task niah_multikey --depth 90 --index 4 \
        --overrides '{"retrieval_heads": 16, "gate_heads": 8}' --layer-search 0-9=exact
"""

from __future__ import annotations

import argparse
import json
from typing import get_args

import torch
from passkey_case import add_case_arguments, generate, layer_values, load_case, override_per_layer

from kvmux.policies.hip import policy as hip
from kvmux.policies.hip.params import Search


def covered_per_head(sel, block_k: int, needle: list[int]) -> list[int]:
    """Needle tokens inside the selected blocks of the last query block, per query head."""
    blocks, valid = sel.blocks[0, :, -1], sel.valid[0, :, -1]
    counts = []
    for head in range(blocks.shape[0]):
        chosen = {b for b, ok in zip(blocks[head].tolist(), valid[head].tolist(), strict=True) if ok}
        counts.append(sum(t // block_k in chosen for t in needle))
    return counts


def add_dense_heads(extra: dict[int, list[int]]) -> None:
    """Patch new HiP sessions so the given query heads of each layer attend densely too."""
    original = hip.HipSession.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for layer, heads in extra.items():
            kept = self.dense_heads[layer]
            chosen = set(heads) | (set(kept.tolist()) if kept is not None else set())
            self.dense_heads[layer] = torch.tensor(sorted(chosen), dtype=torch.long)

    hip.HipSession.__init__ = init


def add_dense_heads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dense-heads",
        action="append",
        default=[],
        metavar="LAYER=H,H",
        help="query heads of one layer attending densely, besides the preset's retrieval heads",
    )


def search_name(value: str) -> str:
    """A `--layer-search` value, checked: an unknown name would otherwise run the hierarchical search silently."""
    if value not in get_args(Search):
        raise SystemExit(f"--layer-search: unknown search {value!r} (one of {', '.join(get_args(Search))})")
    return value


def apply_dense_heads(args: argparse.Namespace) -> None:
    """Make the heads of `--dense-heads` dense in every HiP session created from now on."""
    add_dense_heads(layer_values(args.dense_heads, lambda heads: [int(h) for h in heads.split(",")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, "hip", length=4096, depth=90.0)
    parser.add_argument(
        "--layer-mask-k", action="append", default=[], metavar="LAYER=K", help="a different mask_k on one layer"
    )
    parser.add_argument(
        "--layer-search",
        action="append",
        default=[],
        metavar="LAYERS=SEARCH",
        help="HiP's search (hierarchical or exact) on one layer or a range, e.g. 3-10=exact",
    )
    add_dense_heads_argument(parser)
    args = parser.parse_args()
    layer_searches = layer_values(args.layer_search, search_name)  # checked before the model loads
    loaded, sample, needle = load_case(args)
    apply_dense_heads(args)

    records: list[tuple[int, bool, list[int]]] = []
    original = hip.HipSession.select

    def recording_select(self, call, geo, block_stride, *args):
        sel = original(self, call, geo, block_stride, *args)
        records.append(
            (call.layer_idx, call.query.shape[2] == 1, covered_per_head(sel, self.params.block_size_k, needle))
        )
        return sel

    hip.HipSession.select = recording_select
    override_per_layer(hip.HipSession, "mask_k", layer_values(args.layer_mask_k, int))
    override_per_layer(hip.HipSession, "search", layer_searches)
    generate(loaded, sample, {"preset": "hip", **json.loads(args.overrides)})
    print(f"needle tokens covered per query head (of {len(needle)}):")
    seen: set[tuple[int, bool]] = set()
    for layer, decoding, counts in records:
        if (layer, decoding) in seen:  # later decode refreshes: only the first is printed
            continue
        seen.add((layer, decoding))
        print(f"  layer {layer:2d} {'first decode' if decoding else 'last prompt block'}: {counts}")


if __name__ == "__main__":
    main()
