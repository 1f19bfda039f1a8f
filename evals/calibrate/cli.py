"""`kvmux calibrate`: measure the retrieval-head profile of a model and write it where loading finds it.

For every synthetic needle prompt (`prompts.py`: the shipped prose corpus as haystack, several
lengths and depths), greedy decoding with dense attention records which heads copy the needle
(`probe.py`, the copy-paste score of Retrieval Heads, arXiv 2404.15574). A head's score is its mean
over the prompts. The profile (JSON, keyed by the model id and a hash of the weights) goes to the
cache directory, `$KVMUX_CACHE_DIR/retrieval_heads/`, where loading the same weights finds it
(`--out` writes a copy too, e.g. into configs/retrieval_heads/ to ship it). Each prompt's result is
appended to a `.partial.jsonl` next to it as soon as it is measured, so an interrupted run resumes
where it stopped; `--plot` writes the heat-map. `--gates PRESET` also measures, for a HiP or FlexPrefill preset, each
head's gate gain on the prompts of `--gate-lengths` (`gates.py`: DuoAttention's head gate as one
gradient) and stores it in the profile, for the policy's `gate_heads`; `--gate-tasks` picks the tasks of those
prompts (niah_single_book by default; also niah_single, passkey, passkey_book; the gains are the mean
over all of them).

Examples:
  kvmux calibrate
  kvmux calibrate --model Qwen/Qwen2.5-7B-Instruct --lengths 4K,16K,32K --samples 2
  kvmux calibrate --out configs/retrieval_heads/SmolLM2-135M-Instruct.json --plot docs/results/retrieval_heads.png
  kvmux calibrate --gates hip_rh --gates-only --gate-lengths 8K --out configs/retrieval_heads/SmolLM2-135M-Instruct.json
  kvmux calibrate --gates hip_rh --gates-only --gate-lengths 8K --gate-tasks niah_single_book,passkey --seed 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvmux import cli_args
from kvmux.evals.calibrate.prompts import COPY_TASK, TASKS
from kvmux.evals.calibrate.records import read_partial

METHOD = "copy-paste retrieval score (Retrieval Heads, arXiv 2404.15574), greedy decoding, dense attention"


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `calibrate` on an argparse subparsers object; returns the new parser."""
    p = cli_args.add_subcommand(subparsers, "calibrate", "measure a model's retrieval-head profile", __doc__)
    cli_args.add_model_flags(p)
    cli_args.add_run_flags(p)
    p.add_argument("--lengths", type=cli_args.token_counts, default=[1024, 2048, 4096, 8192], help="prompt tokens")
    p.add_argument("--depths", type=cli_args.comma_list(float), default=[10, 30, 50, 70, 90], help="needle depths, %%")
    p.add_argument("--samples", type=int, default=1, help="prompts per length and depth")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--raw",
        action="store_true",
        help="plain prompts ending in the answer prefix, as `kvmux eval` makes them (default: the chat template "
        "when the tokenizer has one)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the profile here")
    p.add_argument("--plot", type=Path, default=None, help="write the heat-map of the scores (PNG)")
    p.add_argument(
        "--gates", default=None, metavar="PRESET", help="also measure gate gains for this HiP or FlexPrefill preset"
    )
    p.add_argument(
        "--gates-only", action="store_true", help="keep the model's profile, only add the gate gains of --gates"
    )
    p.add_argument(
        "--gate-lengths", type=cli_args.token_counts, default=[8192], help="prompt tokens of the gate prompts"
    )
    p.add_argument(
        "--gate-tasks",
        type=cli_args.comma_list(gate_task),
        default=[COPY_TASK],
        help=f"tasks of the gate prompts, comma list of {', '.join(TASKS)} (default: {COPY_TASK})",
    )
    p.set_defaults(func=cmd_calibrate)
    return p


def gate_task(name: str) -> str:
    """An argparse item type: a task the gate prompts can come from (ValueError otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown gate task {name!r}; expected one of {', '.join(TASKS)}")
    return name


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvmux.models.loader import load_model, model_id
    from kvmux.models.retrieval_profile import (
        RetrievalProfile,
        profile_dirs,
        profile_file_name,
        weights_sha256,
        write_profile,
    )

    cli_args.apply_threads(args.threads)
    spec = cli_args.model_spec(args)
    loaded = load_model(spec)
    info, name, weights = loaded.info, model_id(spec), weights_sha256(loaded.model)
    target = profile_dirs()[0] / profile_file_name(name, weights)
    chat = uses_chat(loaded.tokenizer, args.raw)
    runner = loaded.runner(args.prefill_chunk)
    if args.gates_only:
        data = found_profile_data(info, args.gates)
    else:
        lengths = [n for n in args.lengths if n <= info.max_context]
        if not lengths:
            raise SystemExit(f"calibrate: no --lengths fit the model's {info.max_context}-token context")
        if len(lengths) < len(args.lengths):
            print(f"calibrate: lengths over the model's {info.max_context}-token context skipped")
        partial = target.with_suffix(".partial.jsonl")
        data = calibrate(loaded, runner, lengths, args.depths, args.samples, args.seed, chat, partial)
        data = {"model": name, "weights_sha256": weights, **data, "gates": kept_gates(target, weights, data["scores"])}
    if args.gates:
        data["gates"].update(gates_entry(args, loaded, runner, RetrievalProfile.from_dict(data), target, chat))
    for path in [target] + ([args.out] if args.out else []):
        write_profile(path, data)
        print(f"calibrate: profile written to {path}")
    profile = RetrievalProfile.from_dict(data)
    top = ", ".join(f"L{layer}H{head}" for layer, head in profile.top_heads(8))
    print(f"calibrate: {data['prompts']} copy-score prompts in {data['seconds']:.0f} s; best heads {top}; best layer "
          f"{profile.best_layer()}")  # fmt: skip
    if args.plot:
        from kvmux.evals.calibrate.plot import plot_profile

        plot_profile(profile, args.plot)
        print(f"calibrate: plot written to {args.plot}")
    return 0


def uses_chat(tokenizer, raw: bool) -> bool:
    """Whether the calibration prompts use the chat template: when the tokenizer has one, unless --raw."""
    return bool(getattr(tokenizer, "chat_template", None)) and not raw


def calibrate(
    loaded, runner, lengths: list[int], depths: list[float], samples: int, seed: int, chat: bool, partial: Path
) -> dict:
    """Measure every prompt not yet in `partial` (appending each result); returns the profile's fields."""
    from tqdm import tqdm

    from kvmux.evals.calibrate.probe import probe_prompt
    from kvmux.evals.calibrate.prompts import needle_prompts

    prompts = needle_prompts(loaded.tokenizer, lengths, depths, samples, seed, chat)
    done = read_partial(partial)
    todo = [p for p in prompts if done.get(p.key, {}).get("prompt_sha256") != p.sample.prompt_sha256]
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as out:
        for prompt in tqdm(todo, desc="calibrate", unit="prompt", initial=len(prompts) - len(todo), total=len(prompts)):
            start = time.perf_counter()
            result = probe_prompt(runner, loaded.info, prompt.ids, prompt.value_positions)
            answer = loaded.tokenizer.decode(result.generated)
            record = {
                "key": prompt.key,
                "prompt_sha256": prompt.sample.prompt_sha256,
                "prompt_tokens": len(prompt.ids),
                "correct": prompt.value in answer,
                "seconds": round(time.perf_counter() - start, 2),
                "scores": [[round(x, 4) for x in row] for row in result.scores().tolist()],
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            done[prompt.key] = record
    records = [done[p.key] for p in prompts]
    return aggregate(records, lengths, depths, samples, seed, chat)


def found_profile_data(info, gates: str | None) -> dict:
    """`--gates-only`: the JSON of the profile found for the loaded weights, to add gate gains to."""
    profile = info.retrieval_heads
    if not gates:
        raise SystemExit("calibrate: --gates-only needs --gates PRESET")
    if profile is None:
        raise SystemExit("calibrate: --gates-only needs a retrieval-head profile of these weights; run without it")
    data = json.loads(Path(profile.source).read_text(encoding="utf-8")) if profile.source else profile.as_dict()
    return {**data, "gates": dict(data.get("gates", {}))}


def kept_gates(target: Path, weights: str, scores: list) -> dict:
    """The gate gains of an earlier profile of these weights, kept when this run measures other ones.

    Gains are measured with the profile's retrieval heads already dense, so they are dropped (with a
    message) when this run's copy scores differ from the ones they were measured with."""
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if data.get("weights_sha256") != weights or not data.get("gates"):
        return {}
    if data.get("scores") != scores:
        print(f"calibrate: gate gains of {', '.join(sorted(data['gates']))} dropped: they were measured with "
              "other copy scores; run --gates again")  # fmt: skip
        return {}
    return dict(data["gates"])


def gates_entry(args, loaded, runner, profile, target: Path, chat: bool) -> dict:
    """{policy: gains} of `--gates`, measured with the profile just calibrated."""
    import dataclasses

    import torch

    from kvmux.evals.calibrate.gates import check_gated, measure_gates, top_gains
    from kvmux.evals.calibrate.prompts import needle_prompts
    from kvmux.policies.presets import load_presets

    presets = load_presets(cli_args.presets_dir(args))
    if args.gates not in presets:
        raise SystemExit(f"calibrate: unknown preset {args.gates!r}; available: {', '.join(sorted(presets))}")
    preset = presets[args.gates]
    try:
        check_gated(preset)
    except ValueError as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    lengths = [n for n in args.gate_lengths if n <= loaded.info.max_context]
    if not lengths:
        raise SystemExit(f"calibrate: no --gate-lengths fit the model's {loaded.info.max_context}-token context")
    if not args.gate_tasks:
        raise SystemExit(f"calibrate: --gate-tasks needs one of {', '.join(TASKS)}")
    prompts = [
        prompt
        for task in args.gate_tasks
        for prompt in needle_prompts(loaded.tokenizer, lengths, args.depths, args.samples, args.seed, chat, task)
    ]
    info = dataclasses.replace(loaded.info, retrieval_heads=profile)
    partial = target.with_suffix(f".gates-{preset.name}.partial.jsonl")
    entry = measure_gates(loaded, runner, info, preset, prompts, partial)
    entry.update(lengths=lengths, tasks=list(args.gate_tasks), seed=args.seed, prompt_format="chat" if chat else "raw")
    best = ", ".join(f"L{layer}H{head}" for layer, head, _ in top_gains(torch.tensor(entry["gains"]), 8))
    print(f"calibrate: {preset.policy.name} gate gains of {preset.name} over {entry['prompts']} prompts; best {best}")
    return {preset.policy.name: entry}


def aggregate(records: list[dict], lengths, depths, samples: int, seed: int, chat: bool) -> dict:
    """The profile's fields: every head's mean score over the prompts, and how they were made."""
    layers = len(records[0]["scores"])
    heads = len(records[0]["scores"][0])
    scores = [
        [round(sum(r["scores"][layer][head] for r in records) / len(records), 4) for head in range(heads)]
        for layer in range(layers)
    ]
    return {
        "method": METHOD,
        "haystack": "niah_single_book (the shipped Pride and Prejudice), 7-digit needle values",
        "prompt_format": "chat" if chat else "raw",
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "seed": seed,
        "prompts": len(records),
        "answers_correct": sum(bool(r["correct"]) for r in records),
        "seconds": round(sum(r["seconds"] for r in records), 1),
        "scores": scores,
    }
