"""Does FlexPrefill keep the passkey's key blocks for the last query block? Per layer and head.

Builds the same seeded passkey prompt as `kvmux eval` (task passkey, raw format, seed 42) and runs
it through the `flexprefill` preset (with optional parameter overrides, and optionally a different
gamma on chosen layers only). For every layer it prints the query heads whose selection leaves
one of the needle's key blocks out of the last query block's row (the row that produces the first
answer token), with the head's pattern, its vertical budget and the rank of the needle's column
by the probe's pooled vertical mass. Separates a selection miss from a miss in reading. The
prompt is prefilled in one forward (the preset's default), so the n-th selection is layer n.

    python scripts/diagnose_flexprefill.py --length 2048 --depth 10 --index 0
    python scripts/diagnose_flexprefill.py --length 2048 --depth 10 --layer-gamma 18=0.97
    python scripts/diagnose_flexprefill.py --task niah_multikey_book --length 2048 --depth 10 --other 7410164

`--other TEXT` (e.g. a wrong answer: a distractor needle's value) adds, per layer, how many heads keep
the answer's key blocks and how many keep the blocks of TEXT's first occurrence in the prompt.
"""

from __future__ import annotations

import argparse
import json

import torch
from passkey_case import add_case_arguments, generate, layer_values, load_case, override_per_layer

from kvmux.policies.flexprefill import patterns, policy


def vertical_ranks(query: torch.Tensor, key: torch.Tensor, scaling: float, block_size: int) -> torch.Tensor:
    """Rank (0 = first) of every key block by the probe's pooled vertical mass, per query head: [Hq, nkb]."""
    hq, hkv = query.shape[0], key.shape[0]
    rows = min(block_size, query.shape[1])
    g = hq // hkv
    parts = [patterns.probe(query[i * g : (i + 1) * g], key[i : i + 1], scaling, rows) for i in range(hkv)]
    pooled = patterns.block_pool(torch.cat(parts).mean(1)[..., None], block_size)[..., 0]
    return torch.argsort(torch.argsort(pooled, dim=-1, descending=True), dim=-1)


def missing_heads(sel, ranks: torch.Tensor, needle_blocks: list[int]) -> list[str]:
    """Heads whose last query block's row leaves out a needle block, with pattern, budget and rank."""
    missing = []
    for head in range(sel.blocks.shape[0]):
        row = sel.blocks[head, -1]
        if not all(bool(row[b]) for b in needle_blocks):
            pattern = "query-aware" if bool(sel.query_aware[head]) else "vertical-slash"
            rank = min(int(ranks[head, b]) for b in needle_blocks) + 1
            columns = int(sel.n_vertical[head])
            missing.append(f"head {head} ({pattern}, {columns} columns, needle column rank {rank})")
    return missing


def text_token_indices(tokenizer, sample, text: str) -> list[int]:
    """Prompt indices of the tokens overlapping the first occurrence of `text` (SystemExit if absent)."""
    start = sample.prompt.find(text)
    if start < 0:
        raise SystemExit(f"{text!r} is not in the prompt")
    return sample.span_token_indices(tokenizer, start, start + len(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, "flexprefill", length=2048, depth=10.0)
    parser.add_argument(
        "--layer-gamma", action="append", default=[], metavar="LAYER=GAMMA", help="a different gamma on one layer"
    )
    parser.add_argument("--other", default=None, help="also follow the key blocks of this text in the prompt")
    args = parser.parse_args()
    loaded, sample, needle = load_case(args)
    other = text_token_indices(loaded.tokenizer, sample, args.other) if args.other else []
    if other:
        print(f"other text {args.other!r}: tokens {other[0]}-{other[-1]}")

    lines: list[str] = []
    original = policy.select_blocks  # the name the session calls

    def recording_select(query, key, scaling, params):
        sel = original(query, key, scaling, params)
        ranks = vertical_ranks(query, key, scaling, params.block_size)
        missing = missing_heads(sel, ranks, sorted({t // params.block_size for t in needle}))
        line = f"  layer {len(lines):2d}: " + ("; ".join(missing) if missing else "all heads keep it")
        if other:
            lost = missing_heads(sel, ranks, sorted({t // params.block_size for t in other}))
            heads = sel.blocks.shape[0]
            kept, kept_other = heads - len(missing), heads - len(lost)
            line += f"\n            keep the answer: {kept}/{heads}; keep the other: {kept_other}/{heads}"
        lines.append(line)
        return sel

    policy.select_blocks = recording_select
    override_per_layer(policy.FlexPrefillSession, "gamma", layer_values(args.layer_gamma, float))
    result = generate(loaded, sample, {"preset": "flexprefill", **json.loads(args.overrides)})
    print(f"kv {result.kv}")
    print("needle's key blocks left out of the last query block's row:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
