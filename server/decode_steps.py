"""The decode forwards that running requests wait for, answered once per round of the worker loop.

Sessions whose policy allows it (`batched_decode`) share one forward; the others decode alone.
One request's fault stays its own: when a batched forward fails in one row, that request fails
and the others' step is undone (from a checkpoint taken before the forward) and run again alone;
a failure no row owns undoes the step for every request, which then decode one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmux.models.batching import BatchRowError
from kvmux.policies.base import StepInterrupted
from kvmux.server.request_handle import ActiveRequest

if TYPE_CHECKING:
    from kvmux.models.runner import Runner

log = logging.getLogger("kvmux.scheduler")

# ends one request: finish(request, event kind, payload); removes it from the running requests
Finish = Callable[[ActiveRequest, str, Any], None]


def run_decodes(runner: Runner, running: list[ActiveRequest], batch_decode: bool, finish: Finish) -> None:
    """Answer every pending NeedDecode of `running` (the scheduler's list, which `finish` shrinks)."""
    waiting = [a for a in running if a.wants is not None]
    batch = [a for a in waiting if batch_decode and a.state.request.preset.policy.batched_decode]
    if len(batch) < 2:
        batch = []
    singles = [a for a in waiting if a not in batch]
    if batch:
        singles += decode_batch(runner, batch, finish)
    for active in singles:
        if active not in running:
            continue
        try:
            active.reply, active.wants = active.wants.session.decode(runner, active.wants.token), None
        except StepInterrupted:
            finish(active, *active.handle.stopped_outcome())
        except Exception as exc:  # noqa: BLE001
            log.exception("decode failed for %s", active.handle.request.request_id)
            finish(active, "error", exc)


def decode_batch(runner: Runner, batch: list[ActiveRequest], finish: Finish) -> list[ActiveRequest]:
    """One forward for `batch`; returns the requests to re-run alone after a failed step."""
    checkpoints = {}
    for active in list(batch):
        try:
            checkpoints[id(active)] = active.wants.session.checkpoint()
        except Exception as exc:  # noqa: BLE001
            log.exception("checkpoint failed for %s", active.handle.request.request_id)
            finish(active, "error", exc)
            batch.remove(active)
    if len(batch) < 2:
        return batch
    try:
        logits = runner.decode_batch([a.wants.session for a in batch], [a.wants.token for a in batch])
    except BatchRowError as err:
        for row, exc in err.failures.items():
            log.error("request %s failed in a batched decode: %r", batch[row].handle.request.request_id, exc)
            finish(batch[row], "error", exc)
        others = [(row, a) for row, a in enumerate(batch) if row not in err.failures]
        if err.logits is None:  # the forward stopped part-way: undo the others' step, re-run them
            return _undo([a for _, a in others], checkpoints, finish)
        for row, active in others:  # only a row's after_forward failed: the others' step is done
            active.reply, active.wants = err.logits[row], None
        return []
    except Exception:  # noqa: BLE001 - no row owns it: undo the step and run every request alone
        log.exception("batched decode failed; running its requests one by one")
        return _undo(batch, checkpoints, finish)
    for row, active in enumerate(batch):
        active.reply, active.wants = logits[row], None
    return []


def _undo(actives: list[ActiveRequest], checkpoints: dict[int, Any], finish: Finish) -> list[ActiveRequest]:
    retry = []
    for active in actives:
        try:
            active.wants.session.restore(checkpoints[id(active)])
            retry.append(active)
        except Exception as exc:  # noqa: BLE001
            log.exception("could not undo a failed batched step for %s", active.handle.request.request_id)
            finish(active, "error", exc)
    return retry
