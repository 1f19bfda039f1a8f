"""Passkey retrieval with the ActQKV policy on the embedded model, next to full attention.

Prompt: the landmark-attention passkey template (Mohtashami & Jaggi, 2023) filled to a target
token length, a random 5-digit key placed at a chosen depth; greedy decoding of a few tokens;
correct when the first number in the output equals the key. Writes one JSON line per sample.

    python scripts/measure_actqkv.py --lengths 8192 16384 --depths 0.1 0.5 0.9 --policies full actqkv
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time

import torch

from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies.base import SessionRequest
from kvmux.policies.registry import get_policy

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """Token ids of a passkey prompt of about `length` tokens with the key at `depth` (0..1)."""
    key = str(rng.randint(10000, 99999))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    fixed = len(tokenizer.encode("\n".join([TASK, "", info, "", QUESTION])))
    unit = len(tokenizer.encode(" " + FILLER))
    n_units = max(0, (length - fixed) // unit)
    before = int(round(n_units * depth))
    text = "\n".join([TASK, " ".join([FILLER] * before), info, " ".join([FILLER] * (n_units - before)), QUESTION])
    return tokenizer.encode(text), key


def generate(session, runner, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    gen = session.prefill(runner, torch.tensor([ids]))
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            logits = stop.value
            break
    prefill_s = time.perf_counter() - start
    out = []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        out.append(token)
        logits = runner.forward(session, torch.tensor([[token]]))[0, -1]
    return out, prefill_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--policies", nargs="+", default=["full", "actqkv"])
    ap.add_argument("--with-query", action="store_true", help="pass the question as kv_policy.query")
    ap.add_argument("--param", action="append", default=[], help="actqkv override, e.g. topk=46")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec(max_model_len=1 << 20))
    runner, tokenizer = loaded.runner(2048), loaded.tokenizer
    overrides = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    for length in args.lengths:
        for depth in args.depths:
            rng = random.Random(f"{args.seed}-{length}-{depth}")
            ids, key = passkey_prompt(tokenizer, length, depth, rng)
            for name in args.policies:
                policy = get_policy(name)
                params = policy.Params(**(overrides if name == "actqkv" else {}))
                request = SessionRequest(query_text=QUESTION if args.with_query else None)
                session = policy.new_session(params, loaded.info, request)
                out, prefill_s = generate(session, runner, ids, args.new_tokens)
                text = tokenizer.decode(out)
                found = re.search(r"\d+", text)
                row = {
                    "policy": name,
                    "tokens": len(ids),
                    "depth": depth,
                    "key": key,
                    "output": text,
                    "correct": bool(found and found.group() == key),
                    "prefill_s": round(prefill_s, 1),
                    "kv": session.stats().as_dict(),
                    "query": args.with_query,
                    "params": overrides if name == "actqkv" else {},
                }
                row["kv"].pop("blocks_last_step", None)
                print(json.dumps(row), flush=True)
                session.close()


if __name__ == "__main__":
    sys.exit(main())
