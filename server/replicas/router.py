"""Serve's request router for kvmux replicas: consistent hashing on the affinity key, else load.

Built on Ray Serve's `ConsistentHashRouter` (a hash ring with virtual nodes over the request's
`session_id`; when the owner of a key is full, its next replicas on the ring), with two changes:

- a request without a key goes to the less loaded of two random replicas, as Serve's default
  router does (the ring alone would spread such requests at random, blind to load);
- a key `replica:<id>` picks that replica (the ingress reads each replica's metrics this way).

The ingress sets `session_id` to the key of `affinity.affinity_key`; `replica_ids` lists the
replicas of a deployment that the ingress can pin. (Serve ships a custom router's module to its
callers by value, so the router cannot share state with the ingress module.)
"""

from __future__ import annotations

import random

import ray
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

PIN_PREFIX = "replica:"


def replica_ids(app_name: str, deployment_name: str) -> list[str]:
    """Ids of the live replica actors of a deployment (Serve names each actor after its replica id)."""
    ids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else actor
        if ReplicaID.is_full_id_str(name):
            replica = ReplicaID.from_full_id_str(name)
            deployment = replica.deployment_id
            if deployment.app_name == app_name and deployment.name == deployment_name:
                ids.append(replica.unique_id)
    return sorted(ids)


class KvmuxAffinityRouter(ConsistentHashRouter):
    """Affinity first (the key's replica on the hash ring), load-aware without a key."""

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
