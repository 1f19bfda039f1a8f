"""Full attention: every token kept in every layer, dense SDPA. The baseline of every comparison."""

from __future__ import annotations

from kvmux.policies.base import Policy, PolicyParams
from kvmux.policies.prefix import PrefixReuse
from kvmux.policies.registry import register


class FullParams(PolicyParams):
    """Full attention has no parameters."""


@register
class FullPolicy(Policy):
    name = "full"
    paper = ""
    Params = FullParams
    batched_decode = True
    summary = "dense attention over the whole cache (baseline)"

    def prefix_reuse(self, params, info, chunk: int) -> PrefixReuse:
        return PrefixReuse()  # every token's K/V depends on the tokens before it only
