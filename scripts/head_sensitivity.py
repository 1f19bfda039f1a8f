"""Which heads does HiP's sparse attention hurt? A first-order, per-head answer on passkey prompts.

DuoAttention (Xiao et al., 2024, arXiv 2410.10819) gates every head between full and compressed
attention and learns the gates by distillation. This script takes one gradient of that idea: in
every sparse layer each query head's output is `sparse + g * (dense - sparse)` with g = 0 (the HiP
run itself), and dNLL/dg for the first token of `full`'s correct answer estimates how much making
that head dense would lower that token's loss. The prompt is prefilled with HiP without gradients;
only its last rows (the question and the answer prefix) are run with the gates, so the estimate is
for heads made dense at those rows. Only the first answer token is scored, from the prompt's last
row: teacher-forcing more answer tokens in the same forward would change the prompt's last query
block, and with it the keys HiP selects for every row of that block. Prints the heads that would
help most and writes the mean gain per head as JSON (`--out`).

    python scripts/head_sensitivity.py --task passkey --length 8192 --depths 70 --samples 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from diagnose_hip import add_dense_heads_argument, apply_dense_heads

from kvmux.cli_args import apply_threads, default_presets_dir
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer
from kvmux.models.loader import ModelSpec, load_model
from kvmux.models.runner import Runner
from kvmux.policies.base import SessionRequest
from kvmux.policies.dense import dense_attention
from kvmux.policies.hip import policy as hip
from kvmux.policies.presets import load_presets
from kvmux.server.engine import Engine
from kvmux.server.sampling import SamplingParams

TAIL = 96  # prompt rows run with the gates (at least): the question and the answer prefix


def search_without_gradients() -> None:
    """The branch-and-prune search picks blocks (no gradient through a choice); run it without autograd."""
    original = hip.HipSession.select

    def select(self, *args, **kwargs):
        with torch.no_grad():
            return original(self, *args, **kwargs)

    hip.HipSession.select = select


def gated_attention(gates: torch.Tensor):
    """HipSession.attention with each sparse layer's heads mixed toward dense by `gates` [layers, Hq]."""
    original = hip.HipSession.attention

    def attention(self, call):
        out = original(self, call)
        if not torch.is_grad_enabled() or call.layer_idx < self.params.dense_layers:
            return out
        dense = dense_attention(call)  # [B, T, Hq, D]
        return out + gates[call.layer_idx].view(1, 1, -1, 1) * (dense - out)

    return attention


def forward(runner: Runner, session, ids: torch.Tensor) -> torch.Tensor:
    """`Runner.forward` (all logits) without its inference mode, so the gates can take gradients."""
    return Runner.forward.__wrapped__(runner, session, ids, all_logits=True)


def first_answer_token(loaded, presets, sample) -> tuple[int, str] | None:
    """The first greedy token of `full` on the prompt and its three likeliest first tokens (None if
    `full` misses the passkey)."""
    engine = Engine(loaded, presets, default_preset="full", prefill_chunk_tokens=1 << 20)
    result = engine.generate(
        prompt=list(sample.prompt_ids),
        sampling=SamplingParams(max_tokens=8, temperature=0.0, logprobs=3),
        kv_policy={"preset": "full"},
    )
    if sample.answers[0] not in result.text:
        return None
    return result.token_ids[0], top_tokens(loaded.tokenizer, result.logprobs[0][2])


def top_tokens(tokenizer, alternatives: list[tuple[int, float]]) -> str:
    return ", ".join(f"{tokenizer.decode([token])!r} {math.exp(logprob):.3f}" for token, logprob in alternatives)


def head_gains(loaded, presets, sample, answer: int, preset: str) -> tuple[torch.Tensor, float, str]:
    """-dNLL/dg per (layer, head), the first answer token's NLL under the preset and its three likeliest
    first tokens."""
    info, runner = loaded.info, loaded.runner()
    chosen = presets[preset]
    session = chosen.policy.new_session(chosen.params, info, SessionRequest())
    ids = torch.tensor([list(sample.prompt_ids)])
    total, block = ids.shape[1], chosen.params.block_size_q
    tail = TAIL + (total - TAIL) % block  # the prefix stays a whole number of query blocks
    gates = torch.zeros(info.num_layers, info.num_heads, requires_grad=True)
    original = hip.HipSession.attention
    hip.HipSession.attention = gated_attention(gates)
    try:
        with torch.no_grad():
            forward(runner, session, ids[:, : total - tail])
        logits = forward(runner, session, ids[:, total - tail :])
    finally:
        hip.HipSession.attention = original
        session.close()
    nll = torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([answer]))
    best = torch.topk(logits[0, -1].detach().log_softmax(-1), 3)
    tops = top_tokens(loaded.tokenizer, list(zip(best.indices.tolist(), best.values.tolist(), strict=True)))
    nll.backward()
    return -gates.grad.detach(), nll.item(), tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--depths", default="10,30,50,70,90")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--first-sample", type=int, default=0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--preset", default="hip_rh")
    parser.add_argument("--top", type=int, default=16)
    add_dense_heads_argument(parser)
    parser.add_argument(
        "--show",
        action="append",
        default=[],
        type=lambda s: tuple(map(int, s.split("/"))),
        metavar="LAYER/HEAD",
        help="also print this head's gain and rank",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    apply_threads(args.threads)
    loaded = load_model(ModelSpec(prefill_chunk_tokens=1 << 20))
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    presets = load_presets(default_presets_dir())
    search_without_gradients()
    apply_dense_heads(args)
    task, renderer = get_task(args.task), Renderer(loaded.tokenizer)
    total, count, rows = torch.zeros(loaded.info.num_layers, loaded.info.num_heads), 0, []
    for depth in (float(d) for d in args.depths.split(",")):
        for index in range(args.first_sample, args.first_sample + args.samples):
            sample = task.make(renderer, args.length, depth, index, args.seed, 0)
            first = first_answer_token(loaded, presets, sample)
            if first is None:
                print(f"depth {depth:g} sample {index}: full misses it, skipped", flush=True)
                continue
            answer, full_tops = first
            gains, nll, tops = head_gains(loaded, presets, sample, answer, args.preset)
            total += gains
            count += 1
            best = torch.topk(gains.flatten(), 8)
            heads = [
                f"{i // gains.shape[1]}/{i % gains.shape[1]} {v:.3f}"
                for v, i in zip(best.values, best.indices, strict=True)
            ]
            print(f"depth {depth:g} sample {index}: first token under full: {full_tops}", flush=True)
            print(f"  under {args.preset}: {tops}; NLL {nll:.3f}; best heads {', '.join(heads)}", flush=True)
            rows.append({"depth": depth, "index": index, "nll": nll, "gains": gains.tolist()})
            if args.out:  # after every prompt, so a run cut short keeps what it measured
                args.out.write_text(json.dumps({"prompts": rows, "mean": (total / count).tolist()}))
    mean = total / max(count, 1)
    for layer, head in args.show:
        rank = int((mean.flatten() > mean[layer, head]).sum()) + 1
        print(f"layer {layer} head {head}: gain {mean[layer, head]:.4f}, rank {rank} of {mean.numel()}")
    best = torch.topk(mean.flatten(), args.top)
    print(f"mean over {count} prompts, best {args.top}:")
    for value, flat in zip(best.values.tolist(), best.indices.tolist(), strict=True):
        print(f"  layer {flat // mean.shape[1]:2d} head {flat % mean.shape[1]}: {value:.4f}")


if __name__ == "__main__":
    main()
