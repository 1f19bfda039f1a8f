"""`kvmux bench --url ... --peers generate_batch`: transformers continuous batching beside kvmux serving.

After the serving load, the same model is loaded in this process and `model.generate_batch`
(transformers continuous batching: paged KV cache, SDPA-paged attention, greedy, EOS disabled so
every request produces exactly `max_tokens` tokens, as the load's `ignore_eos` does) runs, per
prompt length and concurrency level, the very prompts the load sent: the same calibrated word
count and seeds (`serve_load.level_prompt`), tokenized with the model's tokenizer (`chat`: through
its chat template), at most `concurrency` requests per batch (`max_requests_per_batch`), prompts
prefilled in chunks of at most `prefill_chunk` tokens (`max_batch_tokens`). A small call first is
the warm-up and is not timed. Reported: output tokens/s over the whole call (as the load's output
throughput: all requests released at once, tokens / wall time) and kvmux's ratio to it.

The model must be the one the server serves (`--model`, default the embedded one); the prompt
tokens counted here sit beside the server's in the table, so a mismatch shows.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from kvmux.evals.bench.measure import attention_implementation
from kvmux.evals.bench.serve_load import level_prompt

PEER_NAME = "generate_batch"


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids as the server would see them (`chat`: through the chat template)."""
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return list(tokenizer(prompt)["input_ids"])


def generate_batch(
    model: torch.nn.Module, inputs: list[list[int]], max_tokens: int, concurrency: int, prefill_chunk: int
) -> tuple[float, int, list[str]]:
    """One `generate_batch` call, greedy, exactly `max_tokens` per request: (seconds, output tokens, errors)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    longest = max(len(ids) for ids in inputs) + max_tokens
    page = 256
    batching = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=concurrency * (math.ceil(longest / page) + 1),
        max_batch_tokens=max(prefill_chunk, concurrency),
        max_requests_per_batch=concurrency,
    )
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # "eos_token_id not set" per call
    with attention_implementation(model, "sdpa"), torch.inference_mode():
        start = time.perf_counter()
        out = model.generate_batch(inputs=inputs, generation_config=config, continuous_batching_config=batching)
        seconds = time.perf_counter() - start
    errors = [str(r.error) for r in out.values() if r.error is not None]
    errors += [f"{len(inputs) - len(out)} request(s) returned no result"] if len(out) < len(inputs) else []
    return seconds, sum(len(r.generated_tokens) for r in out.values()), errors


def run_batch_peer(model, tokenizer, load_doc: dict[str, Any], prefill_chunk: int, progress=None) -> list[dict]:
    """A peer row per (prompt length, concurrency) of the load document, beside its first preset's row."""
    say = progress or (lambda message: None)
    settings = load_doc["settings"]
    chat = settings["endpoint"] == "chat"
    max_tokens = settings["max_tokens"]
    first_preset = load_doc["results"][0]["preset"] if load_doc["results"] else None
    rows = []
    warmed = False
    for load_row in (r for r in load_doc["results"] if r["preset"] == first_preset):
        concurrency, seed = load_row["concurrency"], settings.get("seed", 0)
        words = load_row["prompt_words"]
        prompts = [level_prompt(words, seed, concurrency, index) for index in range(load_row["num_requests"])]
        inputs = [encode(tokenizer, prompt, chat) for prompt in prompts]
        row = {
            "peer": PEER_NAME,
            "prompt_tokens_target": load_row["prompt_tokens_target"],
            "concurrency": concurrency,
            "num_requests": len(inputs),
            "mean_prompt_tokens": sum(map(len, inputs)) / len(inputs),
            "kvmux_preset": first_preset,
            "kvmux_output_throughput": load_row["output_throughput"],
        }
        try:
            if not warmed:
                generate_batch(model, [ids[:64] for ids in inputs[:2]], 2, concurrency, prefill_chunk)
                warmed = True
            seconds, tokens, errors = generate_batch(model, inputs, max_tokens, concurrency, prefill_chunk)
        except Exception as exc:  # the peer's failure is its row's note
            row |= {"output_throughput": None, "ratio": None, "errors": [f"{type(exc).__name__}: {exc}"]}
        else:
            throughput = tokens / seconds if seconds > 0 else None
            kvmux = load_row["output_throughput"]
            ratio = kvmux / throughput if kvmux and throughput else None
            row |= {"duration_s": seconds, "total_output_tokens": tokens, "output_throughput": throughput}
            row |= {"ratio": ratio, "errors": errors}
        say(f"{PEER_NAME} c={concurrency}: {row['output_throughput'] or 0:.1f} out tok/s {row['errors'] or ''}")
        rows.append(row)
    return rows
