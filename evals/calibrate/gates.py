"""Gate gains: how much each head's sparse attention costs a HiP or FlexPrefill preset the answer, one number per head.

DuoAttention (Xiao et al., 2024, https://arxiv.org/abs/2410.10819, §3.2) mixes every head between
full and compressed attention, out = sparse + g · (dense − sparse), and learns the gates g by
distillation. Here one gradient of that mix at g = 0 ranks the heads: a head's gain on a prompt is
−dNLL/dg, the first-order drop of the answer's loss if that head attended densely. The answer is the
one dense attention generates, on prompts it answers right (its tokens up to the needle's value).
`kvmux calibrate --gates PRESET` averages the gains over the calibration prompts and stores them in
the model's profile under the policy's name; the policy's `gate_heads` N then makes the N heads of
largest gain dense besides its `retrieval_heads` (`kvmux.policies.retrieval_heads`).

Deviations from DuoAttention: one gradient step on a handful of prompts instead of training the
gates; the compressed attention is the preset's HiP, not a streaming window; and the gains belong to
the preset they were measured with (its retrieval heads, already dense, gain nothing). The prompt is
prefilled without gradients and only its last rows (at least `TAIL`, the prefix a whole number of
query blocks) run with the gates, so a gain is for those rows; HiP's block search runs without
gradients, since a choice of blocks has none. HiP scores only the first answer token: teacher-forcing
more tokens in the same forward would change the prompt's last query block and with it the keys HiP
selects. FlexPrefill scores every answer token and replays its one-pass cells (`gates_flexprefill.py`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmux.evals.calibrate.gate_mix import gate_session
from kvmux.evals.calibrate.gates_flexprefill import flexprefill_answer_nll
from kvmux.models.info import ModelInfo
from kvmux.models.runner import Runner
from kvmux.policies.base import PolicySession, SessionRequest
from kvmux.policies.presets import Preset

METHODS = {
    "hip": "DuoAttention gate gradient at g = 0 (arXiv 2410.10819): -dNLL/dg of dense attention's first answer token",
    "flexprefill": "DuoAttention gate gradient at g = 0 (arXiv 2410.10819): -dNLL/dg of dense attention's answer "
    "tokens (teacher-forced, dense decode), FlexPrefill's one-pass cells replayed",
}
TAIL = 96  # HiP: rows run with the gates (at least): the question and the answer prefix
GATED_POLICIES = tuple(METHODS)


@dataclass
class GateGains:
    gains: torch.Tensor  # fp32 [layers, Hq]: -dNLL/dg per head
    nll: float  # the scored answer tokens' NLL under the preset
    top: list[tuple[int, float]]  # the preset's three likeliest first tokens (id, probability)


def check_gated(preset: Preset) -> None:
    """ValueError unless the preset's policy can be gated here."""
    if preset.policy.name not in GATED_POLICIES:
        raise ValueError(
            f"gate gains are measured for {', '.join(GATED_POLICIES)} presets; {preset.name} runs {preset.policy.name}"
        )


def forward_last(runner: Runner, session: PolicySession, ids: torch.Tensor) -> torch.Tensor:
    """`Runner.forward` (last logits) without its inference mode, so the gates can take gradients."""
    return Runner.forward.__wrapped__(runner, session, ids)[0, -1]


def gated_log_probs(runner: Runner, info: ModelInfo, preset: Preset, ids: list[int], gates: torch.Tensor):
    """Log-probabilities [vocab] of the token after `ids` with the preset's heads mixed toward dense by
    `gates` [layers, Hq] in the prompt's last rows (differentiable in `gates`)."""
    check_gated(preset)
    session = preset.policy.new_session(preset.params, info, SessionRequest())
    gate_session(session, gates)
    prompt = torch.tensor([ids], device=info.device)
    total, block = prompt.shape[1], preset.params.block_size_q
    tail = min(total, TAIL + (total - TAIL) % block)  # the prefix stays a whole number of query blocks
    try:
        if total > tail:
            with torch.no_grad():
                forward_last(runner, session, prompt[:, : total - tail])
        with torch.enable_grad():
            logits = forward_last(runner, session, prompt[:, total - tail :])
    finally:
        session.close()
    return logits.float().log_softmax(-1)


def answer_nll(runner: Runner, info: ModelInfo, preset: Preset, ids: list[int], answer: list[int], gates):
    """(the scored NLL, the first answer token's log-probabilities [vocab]) under the gated preset: HiP's
    first answer token, FlexPrefill's every answer token."""
    check_gated(preset)
    if preset.policy.name == "flexprefill":
        return flexprefill_answer_nll(runner, info, preset, ids, answer, gates)
    log_probs = gated_log_probs(runner, info, preset, ids, gates)
    return -log_probs[answer[0]], log_probs


def gate_gains(runner: Runner, info: ModelInfo, preset: Preset, ids: list[int], answer: list[int]) -> GateGains:
    """The gain of every head for the answer tokens `answer` after the prompt `ids`."""
    gates = torch.zeros(info.num_layers, info.num_heads, device=info.device, requires_grad=True)
    nll, log_probs = answer_nll(runner, info, preset, ids, answer, gates)
    (grad,) = torch.autograd.grad(nll, gates)  # the gates' gradient only: no weight gradients computed or kept
    best = torch.topk(log_probs.detach(), 3)
    top = [(int(t), float(p.exp())) for t, p in zip(best.indices, best.values, strict=True)]
    return GateGains(-grad.float().cpu(), float(nll.detach()), top)


def answer_tokens(tokenizer, generated: list[int], value: str) -> list[int] | None:
    """The generated tokens up to the one that completes `value` (None when they never contain it)."""
    for count in range(1, len(generated) + 1):
        if value in tokenizer.decode(generated[:count]):
            return generated[:count]
    return None


def top_gains(gains: torch.Tensor, count: int) -> list[tuple[int, int, float]]:
    """The `count` heads of largest gain: (layer, head, gain), best first."""
    best = torch.topk(gains.flatten(), min(count, gains.numel()))
    heads = gains.shape[1]
    return [(i // heads, i % heads, v) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]


def measure_gates(loaded, runner: Runner, info: ModelInfo, preset: Preset, prompts: list, partial: Path) -> dict:
    """Gains on every calibration prompt not yet in `partial` (appending each result); returns the
    profile's `gates` entry for the preset's policy: the mean gain over the prompts dense attention
    answers right, and how it was measured."""
    from tqdm import tqdm

    from kvmux.evals.calibrate.probe import probe_prompt
    from kvmux.evals.calibrate.records import read_partial

    check_gated(preset)
    params = preset.params.model_dump(mode="json")
    done = read_partial(partial)
    fresh = {k: r for k, r in done.items() if r.get("params") == params}
    todo = [p for p in prompts if fresh.get(p.key, {}).get("prompt_sha256") != p.sample.prompt_sha256]
    partial.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(todo, desc=f"gates {preset.name}", unit="prompt", initial=len(prompts) - len(todo), total=len(prompts))
    with partial.open("a", encoding="utf-8") as out:
        for prompt in bar:
            start = time.perf_counter()
            dense = probe_prompt(runner, info, prompt.ids, prompt.value_positions)
            answer = answer_tokens(loaded.tokenizer, dense.generated, prompt.value)
            record = {
                "key": prompt.key,
                "prompt_sha256": prompt.sample.prompt_sha256,
                "params": params,
                "correct": answer is not None,
                "answer_tokens": answer or dense.generated,
            }
            if answer is not None:
                found = gate_gains(runner, info, preset, prompt.ids, answer)
                record["nll"] = round(found.nll, 4)
                record["gains"] = [[round(x, 5) for x in row] for row in found.gains.tolist()]
            record["seconds"] = round(time.perf_counter() - start, 2)
            out.write(json.dumps(record) + "\n")
            out.flush()
            fresh[prompt.key] = record
    records = [fresh[p.key] for p in prompts]
    used = [torch.tensor(r["gains"]) for r in records if "gains" in r]
    if not used:
        raise ValueError("gate gains: dense attention answered none of the calibration prompts")
    mean = torch.stack(used).mean(0)
    return {
        "method": METHODS[preset.policy.name],
        "preset": preset.name,
        "params": params,
        "prompts": len(used),
        "skipped_dense_wrong": len(records) - len(used),
        "seconds": round(sum(r["seconds"] for r in records), 1),
        "gains": [[round(x, 5) for x in row] for row in mean.tolist()],
    }
