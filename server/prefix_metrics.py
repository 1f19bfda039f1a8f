"""Prometheus series of the prefix cache, read from the cache at scrape time.

`kvmux_prefix_cache_{hits,misses,cached_tokens,evictions,stored}_total` are counters and
`kvmux_prefix_cache_bytes` / `kvmux_prefix_cache_entries` gauges, all labelled by model and policy
(the algorithm whose session states the entries hold).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from kvmux.server.prefix_cache import PrefixCache

COUNTERS = (
    ("hits", "hits", "Requests that started from a cached prefix."),
    ("misses", "misses", "Requests of a caching policy that found no cached prefix."),
    ("cached_tokens", "tokens_served", "Prompt tokens served from the cache instead of prefilled."),
    ("evictions", "evictions", "Entries evicted for room (capacity or admission of requests)."),
    ("stored", "stored", "Entries stored."),
)


class PrefixCacheCollector(Collector):
    def __init__(self, cache: PrefixCache, model: str):
        self.cache, self.model = cache, model

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counters = dict(self.cache.counters)
        held = self.cache.held_by_label()
        labels = ["model", "policy"]
        for name, attr, doc in COUNTERS:
            family = CounterMetricFamily(f"kvmux_prefix_cache_{name}", doc, labels=labels)
            for policy, c in sorted(counters.items()):
                family.add_metric([self.model, policy], getattr(c, attr))
            yield family
        size = GaugeMetricFamily("kvmux_prefix_cache_bytes", "Bytes held by cached prefix states.", labels=labels)
        count = GaugeMetricFamily("kvmux_prefix_cache_entries", "Cached prefix states.", labels=labels)
        for policy in sorted(set(counters) | set(held)):
            nbytes, entries = held.get(policy, (0, 0))
            size.add_metric([self.model, policy], nbytes)
            count.add_metric([self.model, policy], entries)
        yield size
        yield count


def register_prefix_cache(registry: CollectorRegistry, cache: PrefixCache, model: str) -> None:
    registry.register(PrefixCacheCollector(cache, model))
