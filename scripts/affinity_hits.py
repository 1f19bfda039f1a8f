"""Cache affinity of a replicated kvmux under a mixed multi-document load (docs/scale_out.md).

D documents, Q questions each, asked in a shuffled order by C concurrent clients (a document in
the system turn, its question in the user turn). For each request it records the replica that
answered (`X-Kvmux-Replica`) and, when the server reports them, its cached prompt tokens. Run it
once against a server routing by affinity (`replicas.affinity: prompt`, the default) and once
against one routing by load alone (`affinity: off`), and compare:

- routing hit rate: of the questions after a document's first, the share answered by a replica
  that had already answered a question about that document (what a prefix cache can reuse);
- cached-token rate: cached prompt tokens / prompt tokens (`usage.prompt_tokens_details`), when
  the server reports them;
- prefix-cache hit rate: the rise of `kvmux_prefix_cache_hits_total` / (hits + misses) in
  `GET /metrics`, when the server exports them.

    python scripts/affinity_hits.py --url http://127.0.0.1:8000 --documents 8 --questions 6 \\
        --concurrency 8 --out runs/affinity/prompt.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections import defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

CORPUS = Path(__file__).resolve().parents[1] / "evals" / "corpus" / "pride_and_prejudice.txt"
QUESTIONS = [
    "Who is mentioned first?",
    "Where does this take place?",
    "What is the mood?",
    "Who speaks last?",
    "What is decided?",
    "Summarise it in three words.",
    "Name one person.",
    "What happens next?",
]


def prefix_cache_counts(url: str, headers: dict[str, str]) -> dict[str, float]:
    """Sum of prefix-cache hits and misses over every replica and policy (empty if not exported)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=60).text
    counts: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for kind in ("hits", "misses"):
            if family.name == f"kvmux_prefix_cache_{kind}":
                counts[kind] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return dict(counts)


async def ask(client: httpx.AsyncClient, model: str, document: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": document}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    usage = response.json()["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"replica": response.headers.get("x-kvmux-replica"), "prompt": usage["prompt_tokens"], "cached": cached}


async def run(args: argparse.Namespace) -> dict:
    text = CORPUS.read_text()
    size = args.document_chars
    documents = [text[i * size : (i + 1) * size] for i in range(args.documents)]
    order = [(d, q) for d in range(args.documents) for q in range(args.questions)]
    random.Random(args.seed).shuffle(order)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        before = prefix_cache_counts(args.url, headers)
        gate = asyncio.Semaphore(args.concurrency)
        served: dict[int, set[str]] = defaultdict(set)  # document -> replicas that answered about it
        records = []

        async def one(doc: int, question: int) -> None:
            async with gate:
                record = await ask(client, model, documents[doc], QUESTIONS[question % len(QUESTIONS)], args.max_tokens)
            record["repeat"] = bool(served[doc])
            record["affine"] = record["replica"] in served[doc]
            served[doc].add(record["replica"])
            records.append(record)

        await asyncio.gather(*(one(d, q) for d, q in order))
        after = prefix_cache_counts(args.url, headers)
    repeats = [r for r in records if r["repeat"]]
    reported = [r for r in records if r["cached"] is not None]
    rise = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("hits", "misses")}
    return {
        "url": args.url,
        "documents": args.documents,
        "questions": args.questions,
        "concurrency": args.concurrency,
        "requests": len(records),
        "replicas": sorted({r["replica"] for r in records if r["replica"]}),
        "routing_hit_rate": sum(r["affine"] for r in repeats) / len(repeats) if repeats else None,
        "cached_token_rate": (
            sum(r["cached"] for r in reported) / sum(r["prompt"] for r in reported) if reported else None
        ),
        "prefix_cache_hit_rate": rise["hits"] / (rise["hits"] + rise["misses"]) if any(rise.values()) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="kvmux base URL")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6, help="questions per document")
    parser.add_argument("--document-chars", type=int, default=2000, help="characters per document")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the summary here as JSON")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
