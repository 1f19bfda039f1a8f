"""How close is HiP's branch-and-prune search to the exact top key blocks, and does it keep the needle?

Builds one seeded needle prompt as `kvmux eval` builds it (`passkey_case.py`), prefills it through a HiP
preset in one pass, and at every sparse layer compares, for the prompt's last query block (the one that
gives the first answer token) and each sparse head (the preset's dense heads left out):
- recall: the share of the exact top `mask_k / b_k` blocks by HiP's block score (`search=exact`) that
  the hierarchical search also selects;
- the needle's tokens inside each selection.

    python scripts/hip_search_recall.py --task passkey --length 8192 --depth 70 \
        --overrides '{"retrieval_heads": 16, "gate_heads": 8}'
    python scripts/hip_search_recall.py --task passkey_book --length 8192 --depth 70 \
        --overrides '{"retrieval_heads": 16, "gate_heads": 8}'
"""

from __future__ import annotations

import argparse
import json

import torch
from diagnose_hip import covered_per_head
from passkey_case import add_case_arguments, generate, load_case

from kvmux.policies.hip import policy as hip
from kvmux.policies.hip.exact_search import exact_search


def last_block_sets(sel, heads: list[int]) -> list[set[int]]:
    blocks, valid = sel.blocks[0, :, -1], sel.valid[0, :, -1]
    return [set(blocks[h][valid[h]].tolist()) for h in heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, "hip", length=8192, depth=70.0)
    args = parser.parse_args()
    loaded, sample, needle = load_case(args)
    rows: list[tuple[int, float, float, float, int]] = []
    original = hip.HipSession.select

    def comparing_select(self, call, geo, block_stride, *rest):
        sel = original(self, call, geo, block_stride, *rest)
        if call.query.shape[2] > 1 and self.params.search == "hierarchical":
            p = self.params
            exact = exact_search(
                geo.query_blocks(call.query), call.key, geo.lo, geo.hi, p.mask_k // p.block_size_k,
                p.block_size_k, block_stride,
            )  # fmt: skip
            dense = self.dense_heads[call.layer_idx]
            dense = set(dense.tolist()) if dense is not None else set()
            heads = [h for h in range(call.query.shape[1]) if h not in dense]
            found, best = last_block_sets(sel, heads), last_block_sets(exact, heads)
            recall = sum(len(a & b) / max(len(b), 1) for a, b in zip(found, best, strict=True)) / max(len(heads), 1)
            searched, best_cov = (covered_per_head(s, p.block_size_k, needle) for s in (sel, exact))
            cov_h, cov_e = [searched[h] for h in heads], [best_cov[h] for h in heads]
            lost = sum(e > 0 and c == 0 for c, e in zip(cov_h, cov_e, strict=True))
            rows.append((call.layer_idx, recall, sum(cov_h) / len(heads), sum(cov_e) / len(heads), lost))
        return sel

    hip.HipSession.select = comparing_select
    generate(loaded, sample, {"preset": "hip", **json.loads(args.overrides)})
    print(f"last prompt block, sparse heads; needle {len(needle)} tokens")
    print("layer  recall of exact top  needle tokens: search / exact  heads where only exact reaches the needle")
    for layer, recall, cov_h, cov_e, lost in rows:
        print(f"{layer:5d}  {recall:19.2f}  {cov_h:14.1f} / {cov_e:5.1f}  {lost:3d}")
    mean = torch.tensor([r[1] for r in rows]).mean().item() if rows else float("nan")
    print(f"mean recall {mean:.2f}; heads where only the exact top reaches the needle: {sum(r[4] for r in rows)}")


if __name__ == "__main__":
    main()
