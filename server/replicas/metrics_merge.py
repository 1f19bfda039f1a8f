"""One Prometheus exposition from the expositions of several replicas.

Each replica labels its own series with `replica` (`Metrics.replica`), so their samples never
clash; merging only has to put each metric family once, with the samples of every replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Families:
    """Metric families in the shape `generate_latest` reads (a registry's `collect`)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Iterable[str]) -> bytes:
    """The families of all `texts` (Prometheus text format), each once, with all their samples."""
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = merged.get(family.name)
            if known is None:
                merged[family.name] = family
            else:
                known.samples.extend(family.samples)
    return generate_latest(_Families(list(merged.values())))
