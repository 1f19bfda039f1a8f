"""Measure InfiniRetri (arXiv 2502.12962) on the embedded model: passkey and niah_single retrieval.

Prompts (seeded, generated here, nothing downloaded):
- passkey: the landmark-attention template (Mohtashami & Jaggi 2023) filled to a token budget:
  task line, "The grass is green. ..." garbage, "The pass key is N. Remember it. N is the pass
  key." at depth d, garbage, "What is the pass key?"; the assistant turn starts with
  "The pass key is". Correct when the first integer of the answer is N.
- niah_single: RULER niah_single_1 (noise haystack, word key, 7-digit value), singular wording;
  the assistant turn starts with RULER's answer prefix. Correct when the value is in the answer.

Both are chat prompts (the model's template, answer prefix appended after the assistant header),
decoded greedily. Reading speed = prompt tokens / prefill seconds (wall clock, and CPU seconds of
this process, which a busy shared machine disturbs less).

    python scripts/measure_infiniretri.py --lengths 16384 32768 65536 --samples 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmux.models.loader import ModelSpec, load_model
from kvmux.policies.base import SessionRequest
from kvmux.policies.registry import get_policy

GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NIAH_TASK = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)


@dataclass
class Sample:
    task: str
    messages: list[dict[str, str]]
    answer_prefix: str
    answer: str
    depth: float


def _word_list(name: str) -> list[str]:
    import wonderwords

    path = Path(wonderwords.__file__).parent / "assets" / name
    return [w for w in path.read_text().split("\n") if w.isalpha()]


def _blocks(tokenizer, fixed: str, sep: str, target: int) -> int:
    """How many garbage blocks (joined by `sep`) bring the prompt to about `target` tokens."""
    per_block = len(tokenizer.encode(sep.join([GARBAGE] * 50), add_special_tokens=False)) / 50
    overhead = len(tokenizer.encode(fixed, add_special_tokens=False)) + 40
    return max(2, int((target - overhead) / per_block))


def passkey_sample(tokenizer, target: int, depth: float, rng: random.Random) -> Sample:
    key = rng.randint(1, 50000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    n = _blocks(tokenizer, PASSKEY_TASK + info, " ", target)
    k = round(depth * n)
    content = "\n".join(
        [PASSKEY_TASK, " ".join([GARBAGE] * k), info, " ".join([GARBAGE] * (n - k)), "What is the pass key?"]
    )
    return Sample("passkey", [{"role": "user", "content": content}], "The pass key is", str(key), depth)


def niah_sample(tokenizer, target: int, depth: float, rng: random.Random, words: tuple[list, list]) -> Sample:
    key = f"{rng.choice(words[0])}-{rng.choice(words[1])}"
    value = rng.randint(10**6, 10**7 - 1)
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    n = _blocks(tokenizer, NIAH_TASK + needle + question, "\n", target)
    lines = [GARBAGE] * n
    lines.insert(round(depth * n), needle)
    content = f"{NIAH_TASK}\n" + "\n".join(lines) + f"\n{question}"
    prefix = f" The special magic number for {key} mentioned in the provided text is"
    return Sample("niah_single", [{"role": "user", "content": content}], prefix, str(value), depth)


def make_samples(tokenizer, task: str, target: int, count: int, seed: int) -> list[Sample]:
    rng = random.Random(f"{task}-{target}-{seed}")
    words = (_word_list("adjectivelist.txt"), _word_list("nounlist.txt"))
    depths = [(i + 0.5) / count for i in range(count)]
    if task == "passkey":
        return [passkey_sample(tokenizer, target, d, rng) for d in depths]
    return [niah_sample(tokenizer, target, d, rng, words) for d in depths]


def is_correct(sample: Sample, text: str) -> bool:
    if sample.task == "passkey":
        found = re.search(r"\d+", text)
        return bool(found) and found.group(0) == sample.answer
    return sample.answer in text


def run_one(loaded, runner, policy: str, params: dict, sample: Sample, max_new: int = 12) -> dict:
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)
    prompt += sample.answer_prefix
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    chosen = get_policy(policy)
    session = chosen.new_session(
        chosen.Params(**params), loaded.info, SessionRequest(prompt_text=prompt, messages=sample.messages)
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    gen = session.prefill(runner, ids)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            logits = stop.value
            break
    if loaded.info.device.type == "cuda":
        torch.cuda.synchronize()
    read_s, read_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    out: list[int] = []
    for _ in range(max_new):
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits = session.decode(runner, token)
    text = tokenizer.decode(out, skip_special_tokens=True)
    stats = session.stats().as_dict()
    session.close()
    return {
        "policy": policy,
        "task": sample.task,
        "prompt_tokens": ids.shape[1],
        "depth": sample.depth,
        "answer": sample.answer,
        "output": text,
        "correct": is_correct(sample, text),
        "read_s": round(read_s, 3),
        "read_tokens_per_s": round(ids.shape[1] / read_s, 1),
        "read_tokens_per_cpu_s": round(ids.shape[1] / read_cpu_s, 1),
        "kv": stats,
    }


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["task"], row["target"]), []).append(row)
    table = []
    for (policy, task, target), items in sorted(groups.items()):
        table.append(
            {
                "policy": policy,
                "task": task,
                "target_tokens": target,
                "samples": len(items),
                "accuracy": round(sum(r["correct"] for r in items) / len(items), 3),
                "mean_prompt_tokens": round(sum(r["prompt_tokens"] for r in items) / len(items)),
                "read_tokens_per_s": round(sum(r["read_tokens_per_s"] for r in items) / len(items), 1),
                "read_tokens_per_cpu_s": round(sum(r["read_tokens_per_cpu_s"] for r in items) / len(items), 1),
                "retention_ratio": round(sum(r["kv"].get("retention_ratio", 1.0) for r in items) / len(items), 4),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    parser.add_argument("--policies", nargs="+", default=["infiniretri"])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=json.loads, default={}, help="infiniretri parameter overrides (JSON)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec())
    runner = loaded.runner(2048)
    warm = make_samples(loaded.tokenizer, "passkey", 2048, 1, args.seed + 1)[0]
    for policy in args.policies:  # warm-up (kernels, allocator) outside the timings
        run_one(loaded, runner, policy, args.params if policy == "infiniretri" else {}, warm, max_new=2)
    rows = []
    for target in args.lengths:
        for task in args.tasks:
            for sample in make_samples(loaded.tokenizer, task, target, args.samples, args.seed):
                for policy in args.policies:
                    params = args.params if policy == "infiniretri" else {}
                    row = run_one(loaded, runner, policy, params, sample)
                    row["target"] = target
                    rows.append(row)
                    kept = row["kv"].get("tokens_retained", "-")
                    print(
                        f"{policy:12s} {task:12s} {row['prompt_tokens']:6d} d={sample.depth:.2f} "
                        f"ok={row['correct']!s:5s} kept={kept} {row['read_tokens_per_s']:8.1f} tok/s "
                        f"{row['output']!r}",
                        flush=True,
                    )
    table = summarise(rows)
    for line in table:
        print(json.dumps(line))
    if args.out:
        info = {"device": str(loaded.info.device), "dtype": str(loaded.info.dtype), "params": args.params}
        args.out.write_text(json.dumps({"setup": info, "summary": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
