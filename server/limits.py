"""Request limits derived from the machine, and the memory a request needs before it is admitted.

Two settings may be `auto` (the default), resolved once the model is loaded:

- `kv_memory_budget_bytes: auto` = a share of the memory left after loading the model: on CUDA,
  `GPU_MEMORY_SHARE` of the device's free memory (`torch.cuda.mem_get_info`); on CPU,
  `CPU_MEMORY_SHARE` of the available RAM (MemAvailable in /proc/meminfo, else the free pages from
  `os.sysconf`; less when a container's memory cgroup leaves less room). The rest is headroom for
  what the budget does not count: the model's weights' working set, one `prefill_chunk_tokens`
  forward's activations, the allocator's slack, the Python process and anything else running on
  the machine.
- `max_prompt_tokens: auto` = the prompt whose full KV cache would fill the budget (at least the
  model's context length, at most `AUTO_MAX_PROMPT_TOKENS`): longer prompts are refused with a 400
  whatever the policy, so a request can no longer be as long as the body limit allows.

What a request needs (`request_bytes`): its policy's KV bound for prompt + max_tokens tokens, plus
the transient memory of its largest step (`Policy.step_bytes_needed`: the scores a policy
materialises, passes longer than one prefill chunk). The scheduler reserves both per running request
(a conservative bound: only one step runs at a time) and answers 503 when one request alone needs
more than the whole budget.

The estimate may fall short by one prefill chunk's activations, which are left to the share
outside the budget, and does not count the one-off growth of the first request after start-up
(lazily initialised weights and kernels), which the auto share leaves room for. How the estimates
compare with the measured growth per preset: docs/results/server.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from kvmux.models.info import ModelInfo
    from kvmux.policies.presets import Preset

log = logging.getLogger("kvmux.limits")

Auto = Literal["auto"]
AUTO: Auto = "auto"
CPU_MEMORY_SHARE = 0.5  # of the RAM available after the model is loaded
GPU_MEMORY_SHARE = 0.7  # of the device memory free after the model is loaded
AUTO_MAX_PROMPT_TOKENS = 1 << 20  # upper end of the derived prompt limit
DEFAULT_MAX_QUERY_TOKENS = 1024  # longest kv_policy.query, in tokens


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on `device` now (None when it cannot be measured).

    On CPU: the machine's available RAM, or less when this process's cgroup (a container's memory
    limit) leaves less room than that, since /proc/meminfo shows the host's memory.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    machine = _meminfo_available()
    room = cgroup_room_bytes()
    if machine is None or room is None:
        return machine if room is None else room
    return min(machine, room)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


def cgroup_room_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """limit - usage of the memory cgroup seen at `root` (v2, else v1); None when unlimited or absent."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= UNLIMITED:
            return None
        return max(0, int(limit_text) - usage)
    return None


@dataclass(frozen=True)
class ServerLimits:
    """The limits requests are checked against, with where each value came from (for the start-up log)."""

    kv_memory_budget_bytes: int | None
    max_prompt_tokens: int | None
    max_query_tokens: int | None
    available_bytes: int | None = None
    sources: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.sources)


def auto_kv_memory_budget(device: torch.device) -> tuple[int | None, int | None, str]:
    """(budget, measured bytes, how it was derived) for `kv_memory_budget_bytes: auto`."""
    available = available_memory_bytes(device)
    if available is None:
        return None, None, "auto: free memory could not be measured, no budget"
    share = GPU_MEMORY_SHARE if device.type == "cuda" else CPU_MEMORY_SHARE
    where = f"free memory of {device}" if device.type == "cuda" else "available RAM"
    budget = max(1, int(available * share))
    return budget, available, f"auto: {share:.0%} of {available / 2**30:.1f} GiB {where}"


def auto_max_prompt_tokens(info: ModelInfo, budget: int | None) -> tuple[int, str]:
    """`max_prompt_tokens: auto`: tokens whose full KV fills the budget, within [context, AUTO_MAX_PROMPT_TOKENS]."""
    if budget is None:
        return max(info.max_context, AUTO_MAX_PROMPT_TOKENS), "auto: no memory budget, the upper end"
    fits = budget // max(info.kv_bytes_per_token, 1)
    tokens = min(max(fits, info.max_context), max(AUTO_MAX_PROMPT_TOKENS, info.max_context))
    return tokens, (
        f"auto: full KV of {fits} tokens fits the budget ({info.kv_bytes_per_token} B/token), "
        f"bounded to [{info.max_context}, {AUTO_MAX_PROMPT_TOKENS}]"
    )


def resolve_limits(
    info: ModelInfo,
    kv_memory_budget_bytes: int | Auto | None = AUTO,
    max_prompt_tokens: int | Auto | None = AUTO,
    max_query_tokens: int | None = DEFAULT_MAX_QUERY_TOKENS,
) -> ServerLimits:
    """Resolve `auto` settings for the loaded model (call after loading it) and log the result."""
    available = None
    if kv_memory_budget_bytes == AUTO:
        budget, available, budget_source = auto_kv_memory_budget(info.device)
    else:
        budget, budget_source = kv_memory_budget_bytes, "configured" if kv_memory_budget_bytes else "none"
    if max_prompt_tokens == AUTO:
        prompt, prompt_source = auto_max_prompt_tokens(info, budget)
    else:
        prompt, prompt_source = max_prompt_tokens, "configured" if max_prompt_tokens else "none"
    limits = ServerLimits(
        kv_memory_budget_bytes=budget,
        max_prompt_tokens=prompt,
        max_query_tokens=max_query_tokens,
        available_bytes=available,
        sources=(
            ("kv_memory_budget_bytes", f"{budget} ({budget_source})"),
            ("max_prompt_tokens", f"{prompt} ({prompt_source})"),
            ("max_query_tokens", f"{max_query_tokens}"),
        ),
    )
    log.info("request limits: %s", limits.describe())
    return limits


def request_bytes(
    preset: Preset, info: ModelInfo, prompt_tokens: int, max_tokens: int, chunk: int, query_tokens: int = 0
) -> tuple[int, int]:
    """(KV bytes, transient bytes of the largest step) a request needs under its preset."""
    tokens = prompt_tokens + max_tokens
    kv = preset.policy.kv_bytes_needed(preset.params, info, tokens)
    step = preset.policy.step_bytes_needed(preset.params, info, tokens, chunk, query_tokens)
    return kv, step


def prepared_request_bytes(engine: Any, request: Any) -> tuple[int, int]:
    """`request_bytes` of a prepared request on `engine` (its runner's prefill chunk, its query's tokens)."""
    query_ids = request.session_request.query_ids
    return request_bytes(
        request.preset,
        engine.info,
        len(request.prompt_ids),
        request.sampling.max_tokens,
        engine.runner.prefill_chunk_tokens,
        len(query_ids) if query_ids else 0,
    )


def resolve_budget(setting: int | Auto | None, engine: Any) -> int | None:
    """A scheduler's budget setting with `auto` replaced by the engine's resolved budget."""
    if setting == AUTO:
        limits = getattr(engine, "limits", None)
        return limits.kv_memory_budget_bytes if limits is not None else None
    return setting
