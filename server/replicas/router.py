"""Serve's request router for kvmux replicas: consistent hashing on the affinity key, else load.

Built on Ray Serve's `ConsistentHashRouter` (a hash ring with virtual nodes over the request's
`session_id`; when the owner of a key is full, its next replicas on the ring), with two changes:

- a request without a key goes to the less loaded of two random replicas, as Serve's default
  router does (the ring alone would spread such requests at random, blind to load);
- a key `replica:<id>` picks that replica (the ingress reads each replica's metrics this way).

The ingress sets `session_id` to the key of `affinity.affinity_key`. The router also records,
per deployment, the replicas it routes to (`live_replicas`), for the ingress in the same process.
"""

from __future__ import annotations

import random

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

PIN_PREFIX = "replica:"
_LIVE: dict[tuple[str, str], tuple[str, ...]] = {}


def live_replicas(app_name: str, deployment_name: str) -> tuple[str, ...]:
    """Ids of the replicas a router in this process currently routes to (empty before its first request)."""
    return _LIVE.get((app_name, deployment_name), ())


class KvmuxAffinityRouter(ConsistentHashRouter):
    """Affinity first (the key's replica on the hash ring), load-aware without a key."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._record_live()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._record_live()

    def _record_live(self) -> None:
        ids = tuple(sorted(r.unique_id for r in self.curr_replicas))
        _LIVE[(self._deployment_id.app_name, self._deployment_id.name)] = ids

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if key.startswith(PIN_PREFIX):
            wanted = key[len(PIN_PREFIX) :]
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if pinned:
                return [pinned]
            key = ""  # that replica is gone: any replica answers, and says which it is
        if key:
            return await super().choose_replicas(candidate_replicas, pending_request)
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        # two random replicas; Serve's selection then takes the one with the shorter queue
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
