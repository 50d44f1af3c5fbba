"""Failure handling: noticing a dead node, re-planning over the survivors, replaying the caches.

A node is noticed dead within a fraction of a second when a neighbour's connection to it closes
(SIGKILL, crash, power), or after HEARTBEAT_TIMEOUT seconds without a heartbeat (a hung or
unreachable node). Recovery then:

1. decides who is alive (a heartbeat within the last HEARTBEAT_TIMEOUT seconds);
2. re-plans: in a pipeline, survivors keep the layers they hold and take over the dead node's
   range (streaming it if it does not fit their memory); in tensor parallel, the shards are
   recomputed over the survivors;
3. publishes the plan as a new epoch; the survivors load what they lack and drop messages of the
   old epoch still in flight;
4. replays every live cache's log (the tokens and positions of every step so far, in order, and
   the reorders between them) through the new pipeline without computing logits: the same
   kernels on the same shapes rebuild the caches bit for bit;
5. lets the steps that were in flight be sent again.
"""

from __future__ import annotations

import json
import time

from .rendezvous import ClusterError, check_hello, get_json, set_json

HEARTBEAT_TIMEOUT = 1.5


def _beat_age(store, worker_id: int) -> float:
    key = f"hb/{worker_id}"
    if not store.check([key]):
        return 0.0
    return time.time() - float(store.get(key).decode())


def stale_workers(coord, ids: list[int], timeout: float | None = None) -> list[int]:
    """Workers among `ids` whose heartbeat is older than `timeout` (default: the coordinator's
    heartbeat timeout)."""
    limit = coord.heartbeat_timeout if timeout is None else timeout
    return [i for i in ids if _beat_age(coord.monitor_store, i) > limit]


def wait_all(coord, keys: list[str], ids: list[int], timeout: float, what: str) -> dict[int, dict]:
    """{worker id: JSON value} once every key is set; raises ClusterError when a worker reports
    an error, stops beating, or `timeout` passes."""
    store = coord.store
    deadline = time.monotonic() + timeout
    out: dict[int, dict] = {}
    while len(out) < len(keys):
        for key, wid in zip(keys, ids):
            if wid not in out and store.check([key]):
                out[wid] = json.loads(store.get(key).decode())
        if len(out) == len(keys):
            break
        failed = [i for i in ids if store.check([f"fatal/{i}"])]
        if failed:
            raise ClusterError(f"worker {coord.workers[failed[0]]['name']} could not {what}: "
                               f"{store.get(f'fatal/{failed[0]}').decode()}")
        # loading keeps a busy machine busier: give the heartbeats the monitor's slack
        stale = stale_workers(coord, [i for i in ids if i not in out], 3 * coord.heartbeat_timeout)
        if stale:
            raise ClusterError(f"worker(s) {[coord.workers[i]['name'] for i in stale]} stopped answering "
                               f"while asked to {what}")
        if time.monotonic() > deadline:
            missing = [coord.workers[i]["name"] for i in ids if i not in out]
            raise ClusterError(f"worker(s) {missing} did not {what} within {timeout:.0f} s")
        time.sleep(0.02)
    return out


def check_late_joiners(coord) -> None:
    """Refuse, with a reason, every worker that said hello after the cluster formed."""
    store = coord.monitor_store
    joined = store.add("workers", 0)
    for wid in range(coord.answered + 1, joined + 1):
        key = f"hello/{wid}"
        if not store.check([key]):
            return  # its hello is on the way: next round
        h = get_json(store, key)
        from .. import __version__

        reason = check_hello(h, __version__, coord.fingerprint, started=True)
        set_json(store, f"welcome/{wid}", {"error": reason})
        coord.answered = wid


def find_dead(coord) -> list[int]:
    """Worker ids of the current plan that are dead: without a heartbeat for the heartbeat timeout,
    judged once that long has passed since the failure (a live worker has beaten since)."""
    ids = coord.plan["ranks"]
    deadline = coord.failure_time + coord.heartbeat_timeout + 0.5  # a dead worker's last beat is older by then
    while True:
        dead = stale_workers(coord, ids)
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def recover(coord, epoch: int) -> None:
    """Bring the cluster from a failure in `epoch` back to running (once, whichever thread comes
    first; the others wait). Raises ClusterError when no worker survives or recovery fails."""
    from .coordinator import Lost

    with coord.recover_lock:
        if coord.closed:
            raise ClusterError("the cluster is closed")
        if coord.epoch != epoch:
            return  # another thread has recovered already
        if coord.failed_epoch != epoch:
            coord.mark_failed("a step failed", epoch)
        first_failure, reason = coord.failure_time, coord.failure
        attempts: list[str] = []
        for attempt in range(len(coord.workers) + 1):
            t0 = time.monotonic()
            dead = find_dead(coord)
            survivors = [i for i in coord.plan["ranks"] if i not in dead]
            if not survivors:
                raise ClusterError(f"every worker is gone ({coord.failure})")
            plan = coord.plan_maker(survivors, dead)
            try:
                coord.start_epoch(plan, coord.load_timeout)
            except ClusterError as e:
                if not stale_workers(coord, survivors):
                    raise
                attempts.append(f"epoch {coord.epoch + 1}: {e}")
                coord.failure_time = time.monotonic()
                continue  # another worker died while the plan was applied: plan again without it
            t_plan = time.monotonic()
            try:
                replayed = replay(coord)
            except Lost as e:
                attempts.append(f"epoch {coord.epoch} replay: {e}")
                continue  # marked failed in the new epoch: plan again
            break
        else:
            raise ClusterError(f"could not recover from: {reason}; then: {' | '.join(attempts)}")
        coord.recoveries.append({
            "failure": reason, "dead": [coord.workers[i]["name"] for i in dead],
            "survivors": [coord.workers[i]["name"] for i in survivors], "epoch": coord.epoch,
            "replan_seconds": t_plan - t0, "replay_seconds": time.monotonic() - t_plan, "replayed_steps": replayed,
            "recovery_seconds": time.monotonic() - first_failure, "plan": plan.get("summary"),
            "loaded": {coord.workers[i]["name"]: f for i, f in coord.ready_figures.items()}})


def replay(coord) -> int:
    """Rebuild every live cache on the new pipeline from its log; returns the steps replayed.
    Raises Lost (from coordinator) if a node is lost meanwhile."""
    from .coordinator import Lost, RemoteRows, control_message

    futures = []
    for cache in sorted(coord.caches, key=lambda c: c.id):
        for op in [None] + list(cache.log):
            if op is not None and op[0] == "forward":
                _, tokens, positions, logit_index, rows, spans = op
                target = RemoteRows(cache, *rows) if rows is not None else cache
                futures.append(coord.submit(tokens, positions, target, logit_index, spans, replay=True))
                continue
            try:
                with coord.send_lock:
                    if op is None:
                        coord._ensure_cache(cache)
                    else:
                        coord._send(control_message(cache.id, op, coord.epoch), coord.entry_ranks)
            except RuntimeError as e:  # a first-stage rank was lost during the replay
                coord.mark_failed(f"lost a first-stage rank while replaying: {str(e).splitlines()[0][:160]}")
                raise Lost(coord.failure) from None
    for fut in futures:
        try:
            fut.result(timeout=coord.step_timeout)
        except TimeoutError:
            coord.mark_failed("a replayed step got no answer")
            raise Lost(coord.failure) from None
    return len(futures)
