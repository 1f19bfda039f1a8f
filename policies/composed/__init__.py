"""Composed presets: one preset's prefill, then another preset's decode (`policy.py`: the pairs and what
they report; `handover.py`: which pairs are valid and how the cache is handed over; `session.py`: one
request; `calibration.py`: LazyEviction's prompt calibration under another policy's prefill; `spec.py`:
composed presets from files and requests).

Nothing here is registered: a composed preset is built from two registered policies' presets.
"""

from kvmux.policies.composed.handover import CACHE_KIND, REFUSED, pair_problem
from kvmux.policies.composed.policy import ComposedPolicy, compose
from kvmux.policies.composed.session import ComposedSession
from kvmux.policies.composed.spec import composed_preset_from_file, resolve_composed

__all__ = [
    "CACHE_KIND",
    "REFUSED",
    "ComposedPolicy",
    "ComposedSession",
    "compose",
    "composed_preset_from_file",
    "pair_problem",
    "resolve_composed",
]
