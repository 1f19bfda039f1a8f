"""Reports of `kvmux bench`: the results JSON, a Markdown table and PNG plots (and the GPU check's
agreement table).

In-process results (kind "kvmux-bench") become `bench.json`, `bench.md` and `bench.png`
(TTFT, decode rate, KV kept and peak-memory growth against prompt length, one line per preset,
the transformers baseline dashed). Serving-load results (kind "kvmux-serve-load") become
`serve_load.json`, `serve_load.md` and `serve_load.png` (output tokens/s, TTFT and ITL p50/p99
against concurrency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmux.evals.helpers import fmt as _fmt
from kvmux.evals.helpers import pyplot, save_figure

MIB = 1024 * 1024


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def _spread(summary: dict[str, Any], spec: str, scale: float = 1.0) -> str:
    if not summary or summary.get("median") is None:
        return "–"
    med = _fmt(summary["median"], spec, scale)
    if summary.get("n", 0) < 2:
        return med
    return f"{med} [{_fmt(summary['min'], spec, scale)}–{_fmt(summary['max'], spec, scale)}]"


def _prompt_rate(length: int, ttft: dict[str, Any]) -> str:
    """Prompt tokens read per second up to the first token (length / median TTFT)."""
    median = ttft.get("median") if ttft else None
    return "–" if not median else f"{length / median:.0f}"


def bench_markdown(doc: dict[str, Any]) -> str:
    model, settings, env = doc["model"], doc["settings"], doc["environment"]
    lines = [
        f"# kvmux bench: {model['name']}",
        "",
        f"- model: `{model['name']}` ({model['source']}), {model['num_layers']} layers, {model['num_heads']} heads / "
        f"{model['num_kv_heads']} KV heads × {model['head_dim']}, {model['dtype']} on {model['device']}",
        f"- machine: {env.get('gpu') or env['processor']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_threads']} threads",
        f"- {settings['new_tokens']} greedy tokens per run; {settings['warmup']} warm-up round(s) excluded; "
        f"{settings['repeats']} measured round(s), median [min–max]; prefill chunk {settings['prefill_chunk_tokens']}",
        f"- baseline: {settings['baseline']}; ratios (×) are to its median in the same run",
        f"- memory: {settings['memory_measure']} (Δ = growth over the start of the run); prompt: {settings['prompt']}",
        "- KV peak: the most the cache held during the run (KV % full: of a full cache at the end); KV end: what it "
        "holds after the last token (a bounded policy's budget once it has evicted)",
    ]
    if roof := doc.get("roofline"):
        lines.append(
            f"- roofline: memory bandwidth {roof['bytes_per_s'] / 1e9:.1f} GB/s measured at start (best of "
            f"{roof['tries']}: {roof['tensor_mib']} MiB copy {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"sum {roof['read_bytes_per_s'] / 1e9:.1f} GB/s); bytes per decode token = weights "
            f"({roof['weight_bytes'] / MIB:.1f} MiB) + KV kept; roofline tok/s = bandwidth / bytes per token"
        )
    if doc.get("command"):
        lines.append(f"- command: `{doc['command']}`")
    lines += [
        "",
        "| length | preset | policy | TTFT ms | TTFT × | prompt tok/s | decode tok/s | decode × | KV peak MiB "
        "| KV end MiB | KV % full | peak mem MiB | Δ mem MiB | Δ mem × | sparsity | tokens = baseline "
        "| MiB / token | roofline tok/s | % roofline | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["results"]:
        s, r = row["summary"], row.get("ratios") or {}
        if row["status"] != "ok" or not s:
            lines.append(f"| {row['length']} | {row['preset']} | {row['policy']} |" + " – |" * 16 + f" {row['note']} |")
            continue
        kv_ratio = s["kv_ratio"]["median"]
        match = row.get("tokens_match_baseline")
        roof = row.get("roofline") or {}
        lines.append(
            f"| {row['length']} | {row['preset']} | {row['policy']} | {_spread(s['ttft_s'], '.1f', 1e3)} "
            f"| {_ratio(r.get('ttft_s'))} | {_prompt_rate(row['length'], s['ttft_s'])} "
            f"| {_spread(s['decode_tokens_per_s'], '.3g')} "
            f"| {_ratio(r.get('decode_tokens_per_s'))} | {_fmt(s['kv_bytes_kept_peak']['median'], '.1f', 1 / MIB)} "
            f"| {_fmt(s.get('kv_bytes_kept_end', {}).get('median'), '.1f', 1 / MIB)} "
            f"| {_fmt(kv_ratio, '.1f', 100)} | {_fmt(s['peak_mem_bytes']['median'], '.0f', 1 / MIB)} "
            f"| {_fmt(s['peak_mem_delta_bytes']['median'], '.1f', 1 / MIB)} | {_ratio(r.get('peak_mem_delta_bytes'))} "
            f"| {_fmt(s['attention_sparsity']['median'], '.2f')} | {_fmt(match, '.0%', missing='–')} "
            f"| {_fmt(roof.get('bytes_per_token'), '.1f', 1 / MIB)} | {_fmt(roof.get('tokens_per_s'), '.0f')} "
            f"| {_fmt(roof.get('fraction'), '.1%')} | {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def token_label(n: int) -> str:
    """2048 -> '2K', 131072 -> '128K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [token_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt tokens")


def _series(doc: dict[str, Any], metric: str, scale: float = 1.0) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in doc["results"]:
        summary = row["summary"].get(metric) if row["status"] == "ok" else None
        if not summary or summary.get("median") is None:
            continue
        xs, ys = out.setdefault(row["preset"], ([], []))
        xs.append(row["length"])
        ys.append(summary["median"] * scale)
    return out


def bench_plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    from kvmux.evals.bench.measure import BASELINE_NAME

    panels = [
        ("ttft_s", 1e3, "TTFT (ms)"),
        ("decode_tokens_per_s", 1.0, "decode tokens/s"),
        ("kv_bytes_kept_peak", 1 / MIB, "peak KV kept (MiB)"),
        ("peak_mem_delta_bytes", 1 / MIB, "peak memory growth (MiB)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, scale, label) in zip(axes.flat, panels, strict=True):
        for name, (xs, ys) in _series(doc, metric, scale).items():
            style = {"color": "black", "linestyle": "--"} if name == BASELINE_NAME else {}
            ax.plot(xs, ys, marker="o", label=name, **style)
        _length_axis(ax, sorted({row["length"] for row in doc["results"]}))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"kvmux bench — {doc['model']['name']} on {doc['environment'].get('gpu') or doc['model']['device']}")
    save_figure(fig, path)


def load_markdown(doc: dict[str, Any]) -> str:
    settings = doc["settings"]
    lines = [
        f"# kvmux bench (serving load): {doc['model']} at {doc['url']}",
        "",
        f"- {settings['endpoint']} endpoint, {settings['max_tokens']} output tokens (ignore_eos, temperature 0), "
        f"streamed with usage; all requests released at once, at most `concurrency` in flight",
    ]
    if doc.get("command"):
        lines.append(f"- command: `{doc['command']}`")
    lines += [
        "",
        "| preset | prompt tok | conc | ok / failed | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | TPOT p50 ms | E2E p50 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["results"]:
        errors = "; ".join(f"{e['count']}× {e['message'][:80]}" for e in row["errors"][:3])
        prompt = row.get("mean_prompt_tokens") or row["prompt_tokens_target"]
        lines.append(
            f"| {row['preset']} | {_fmt(prompt, '.0f')} | {row['concurrency']} | {row['completed']} / {row['failed']} "
            f"| {_fmt(row['request_throughput'], '.2f')} | {_fmt(row['output_throughput'], '.1f')} "
            f"| {_fmt(row['ttft_ms']['median'], '.0f')} | {_fmt(row['ttft_ms']['p99'], '.0f')} "
            f"| {_fmt(row['itl_ms']['median'], '.1f')} | {_fmt(row['itl_ms']['p99'], '.1f')} "
            f"| {_fmt(row['tpot_ms']['median'], '.1f')} | {_fmt(row['e2el_ms']['median'], '.0f')} | {errors} |"
        )
    if doc.get("peers"):
        lines += [
            "",
            "transformers continuous batching (`model.generate_batch`, SDPA-paged, greedy, EOS off) in the bench's "
            "process on the same prompts and output lengths, at most `concurrency` requests per batch; "
            "kvmux ÷ peer = output tok/s of the kvmux row above (first preset) over the peer's",
            "",
            "| peer | prompt tok | conc | requests | out tok/s | kvmux preset | kvmux out tok/s | kvmux ÷ peer "
            "| errors |",
            "|---|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for row in doc["peers"]:
            lines.append(
                f"| {row['peer']} | {_fmt(row['mean_prompt_tokens'], '.0f')} | {row['concurrency']} "
                f"| {row['num_requests']} | {_fmt(row['output_throughput'], '.1f')} | {row['kvmux_preset']} "
                f"| {_fmt(row['kvmux_output_throughput'], '.1f')} | {_ratio(row['ratio'])} "
                f"| {'; '.join(e[:80] for e in row['errors'][:3])} |"
            )
    return "\n".join(lines) + "\n"


def load_plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in doc["results"]:
        groups.setdefault(f"{row['preset']} @ {row['prompt_tokens_target']}", []).append(row)
    for label, rows in groups.items():
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["output_throughput"] or 0 for r in rows], marker="o", label=label)
        for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
            (line,) = ax.plot(xs, [r[key]["median"] or float("nan") for r in rows], marker="o", label=f"{label} p50")
            ax.plot(
                xs, [r[key]["p99"] or float("nan") for r in rows], marker="x", linestyle=":", color=line.get_color()
            )
    levels = sorted({row["concurrency"] for row in doc["results"]})
    for ax, label in zip(
        axes, ("output tokens/s", "TTFT ms (p50 solid, p99 dotted)", "ITL ms (p50 solid, p99 dotted)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if groups:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"kvmux serving load — {doc['model']}")
    save_figure(fig, path)


def agreement_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# kvmux GPU check: {doc['model']['name']} ({doc['environment'].get('gpu', 'cpu')})",
        "",
        f"- random weights, shape `{doc['shape']}`, bf16; prefill chunk {doc['prefill_chunk_tokens']}; "
        f"budget {doc['budget_s']:.0f} s, used {doc['elapsed_s']:.0f} s",
        f"- agreement at {doc['check_length']} tokens over {doc['check_steps']} teacher-forced steps with "
        "transformers `generate` (SDPA). `full` must match it (pass = top-1 ≥ 87.5% and cosine ≥ 0.99; bf16 "
        "noise flips near-ties of a random model's logits). The other policies must run at this length with "
        "finite logits (ran); their distance from the reference is shown but says little about quality: "
        "a random model spreads its attention over the whole context, so dropping or skipping keys moves "
        "its outputs far more than a trained model's (quality is `kvmux eval`'s job).",
        f"- prompt: {doc['prompt']}; speed: see bench.md (lengths {doc['lengths']})",
        f"- command: `{doc['command']}`",
        "",
        "| preset | policy | status | top-1 agree | first token | cos min | cos mean | KL mean | KL max | s | note |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["agreement"]:
        if "top1_agreement" not in row:
            lines.append(f"| {row['preset']} | {row['policy']} | {row['status']} |" + " – |" * 7 + f" {row['note']} |")
            continue
        lines.append(
            f"| {row['preset']} | {row['policy']} | {row['status']} | {row['top1_agreement']:.0%} "
            f"| {'yes' if row['first_token_match'] else 'no'} | {row['cosine_min']:.4f} | {row['cosine_mean']:.4f} "
            f"| {row['kl_mean']:.4f} | {row['kl_max']:.4f} | {row['seconds']:.1f} | |"
        )
    return "\n".join(lines) + "\n"


def write_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write JSON, Markdown and PNG for a bench or load document; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if doc["kind"] == "kvmux-bench":
        stem, markdown, plot = "bench", bench_markdown, bench_plot
    elif doc["kind"] == "kvmux-serve-load":
        stem, markdown, plot = "serve_load", load_markdown, load_plot
    else:
        raise ValueError(f"unknown results kind {doc['kind']!r}")
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(doc))
    plot(doc, paths["png"])
    return paths
