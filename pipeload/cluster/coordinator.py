"""The coordinator: rank 0. It forms the cluster, places the layers, drives every step, keeps
what is needed to rebuild a lost node's state, and re-plans when a node dies.

To the rest of pipeload it is an Engine (`ClusterEngine`): `executor.forward(tokens, positions,
cache, logit_index)` sends the step to the first stage (pipeline) or to every rank (tensor
parallel) and returns the logits the last stage sends back, so `TokenGenerator`, `PipelineModel`,
the CLI and the server run on a cluster unchanged. Any number of threads may call `forward` at
once (one per stream): their steps are in flight together and every stage stays busy.

A KV cache lives on the stages; the coordinator holds a `RemoteCache` that logs every step and
reorder applied to it. When a node dies the coordinator re-plans over the survivors (recovery.py)
and replays each live cache's log through the new pipeline, which rebuilds the caches bit for bit
(the same kernels on the same shapes), then re-sends the steps that were in flight.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from concurrent.futures import Future, TimeoutError as FutureTimeout
from datetime import timedelta

import torch
import torch.distributed as dist

from . import protocol as P
from .rendezvous import ClusterError, set_json
from .trace import TRACE


PING_GAP = 0.01  # seconds between latency pings


class StepError(ClusterError):
    """A stage raised while running a step (bad input): the message names it."""


class Lost(Exception):
    """A node was lost during this step; the caller recovers and retries (internal)."""


class RemoteCache:
    """The coordinator's handle on a KV cache held by the stages; logs what was done to it."""

    _ids = itertools.count(1)

    def __init__(self, coordinator, batch: int, max_len: int, nbytes: int):
        self.coordinator, self.batch, self.max_len, self.nbytes = coordinator, batch, max_len, nbytes
        self.id = next(self._ids)
        self.initial_batch = batch  # the stages create it with this many rows (reorders shrink it)
        self.created_epoch = -1
        self.log: list[tuple] = []  # ("forward", tokens, positions, logit_index, rows, spans) | ("reorder", index)
        coordinator.caches.add(self)
        weakref.finalize(self, coordinator.free_later, self.id)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequences `index` in that order (on every stage)."""
        self.batch = len(index)
        self.coordinator.control(self, ("reorder", index.clone()))

    def rows(self, start: int, stop: int) -> "RemoteRows":
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {self.batch} sequences")
        return RemoteRows(self, start, stop)

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.coordinator.control(self, ("move_row", src, dst, length))


class RemoteRows:
    """Sequences start..stop-1 of a RemoteCache (what the continuous-batching scheduler uses)."""

    def __init__(self, root: RemoteCache, start: int, stop: int):
        self.root, self.start, self.stop = root, start, stop


def _spans(rows) -> torch.Tensor | None:
    """(B, 2) [start, length] of an exact-batching step's RowSpans (None: not exact)."""
    return None if rows is None else torch.tensor([[r.start, r.length] for r in rows], dtype=torch.int64)


class Coordinator:
    """Drives a formed cluster (see cluster/launch.py for forming it)."""

    def __init__(self, store, monitor_store, plan_maker, workers: dict[int, dict], mode: str, fingerprint: str,
                 step_timeout: float = 60.0, load_timeout: float = 600.0, heartbeat_timeout: float = 1.5):
        self.store, self.monitor_store, self.plan_maker = store, monitor_store, plan_maker
        self.workers, self.mode, self.fingerprint = workers, mode, fingerprint
        self.step_timeout, self.load_timeout, self.heartbeat_timeout = step_timeout, load_timeout, heartbeat_timeout
        self.answered = max(workers) if workers else 0  # highest worker id given an answer
        self.failure_time = 0.0
        self.ready_figures: dict[int, dict] = {}
        self.epoch = 0
        self.plan: dict = {}
        self.world = None
        self.channel: P.Channel | None = None
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.recover_lock = threading.Lock()
        self.pending: dict[int, Future] = {}
        self.steps = itertools.count(1)
        self.caches: weakref.WeakSet[RemoteCache] = weakref.WeakSet()
        self.to_free: list[int] = []
        self.failed_epoch = -1
        self.failure: str | None = None
        self.closed = False
        self.receivers: dict[int, threading.Thread] = {}  # last-stage rank -> its receiving thread
        self.partial: dict[int, dict] = {}                 # step -> {rank: reply} until all ranks answered
        self.monitor_thread: threading.Thread | None = None
        self.errors_seen = 0
        self.recoveries: list[dict] = []
        self.link_latency = 0.0
        self.client_seconds = 0.0
        self.allreduce_seconds: float | None = None  # measured by the tensor-parallel ranks
        self.tp_layer_seconds: float | None = None   # a decode step over the shards per layer, all ranks at once

    # -- routing ---------------------------------------------------------------------------------

    # (no ranks before the first epoch has started: a cluster whose start failed has nobody to tell)
    @property
    def entry_ranks(self) -> list[int]:
        return self.plan.get("tp_ranks", []) if self.mode == "tensor" else self.plan.get("order", [])[:1]

    @property
    def exit_ranks(self) -> list[int]:
        return self.plan.get("tp_ranks", []) if self.mode == "tensor" else self.plan.get("order", [])[-1:]

    # -- epochs ----------------------------------------------------------------------------------

    def start_epoch(self, plan: dict, load_timeout: float) -> None:
        """Publish `plan` as the next epoch and wait until every rank of it holds its part and
        runs; raises ClusterError when a worker fails to load or dies meanwhile."""
        from .recovery import wait_all

        epoch = self.epoch + 1
        plan["epoch"] = epoch
        set_json(self.store, f"plan/{epoch}", plan)
        self.store.set("epoch", str(epoch))
        ids = plan["ranks"]
        ready = wait_all(self, [f"ready/{epoch}/{i}" for i in ids], ids, load_timeout, "load its layers")
        if self.world is None:
            self.world = dist.ProcessGroupGloo(dist.PrefixStore("world/", self.store), 0, plan["world_size"],
                                               timedelta(seconds=P.IDLE_TIMEOUT_SECONDS))
            self.channel = P.Channel(self.world, plan["slot_bytes"])
            self.link_latency = self._ping(plan["world_size"])
        started = wait_all(self, [f"started/{epoch}/{i}" for i in ids], ids, load_timeout, "start")
        reduces = sorted(f["allreduce_seconds"] for f in started.values() if "allreduce_seconds" in f)
        self.allreduce_seconds = reduces[len(reduces) // 2] if reduces else None
        layers = sorted(f["tp_layer_seconds"] for f in started.values() if f.get("tp_layer_seconds"))
        self.tp_layer_seconds = layers[len(layers) // 2] if layers else None
        with self.state_lock:
            self.plan, self.epoch = plan, epoch
            self.failure = None
        self.ready_figures = ready
        self._start_receivers()
        if self.monitor_thread is None:
            self.monitor_thread = threading.Thread(target=self._monitor, name="pipeload-monitor", daemon=True)
            self.monitor_thread.start()

    def _ping(self, world_size: int) -> float:
        """Median one-way latency (s) to the workers, measured by ping-pong on the process group.
        Each ping finds the worker idle for a few ms, as a stage is between its steps: waking a
        sleeping process is part of the price of a hop (a back-to-back ping-pong hides it)."""
        t = torch.zeros(1)
        times = []
        for rank in range(1, world_size):
            for _ in range(int(self.store.get("ping_rounds"))):
                time.sleep(PING_GAP)
                t0 = time.perf_counter()
                self.world.send([t], rank, 1).wait()
                self.world.recv([t], rank, 1).wait()
                times.append((time.perf_counter() - t0) / 2)
        times.sort()
        return times[len(times) // 2] if times else 0.0

    # -- failure ---------------------------------------------------------------------------------

    def mark_failed(self, reason: str, epoch: int | None = None) -> None:
        """Note that a node was lost in `epoch` (default: the current one) and fail the steps in flight."""
        with self.state_lock:
            epoch = self.epoch if epoch is None else epoch
            if epoch != self.epoch or self.failed_epoch == epoch or self.closed:
                return
            self.failed_epoch, self.failure, self.failure_time = epoch, reason, time.monotonic()
            pending, self.pending, self.partial = self.pending, {}, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Lost(reason))

    def _monitor(self) -> None:
        from .recovery import check_late_joiners, stale_workers

        while not self.closed:
            time.sleep(0.1)
            try:
                errors = self.monitor_store.add("errors", 0)
                if errors > self.errors_seen:
                    self.errors_seen = errors
                    self.mark_failed("a worker reported a lost peer")
                # a hung or unreachable node: no heartbeat for a while (a dead one closes its
                # connections, which is noticed at once; a busy machine may delay a beat or two)
                stale = stale_workers(self, self.plan.get("ranks", []), 3 * self.heartbeat_timeout)
                if stale:
                    self.mark_failed(f"no heartbeat from worker(s) {stale}")
                check_late_joiners(self)
            except (RuntimeError, OSError) as e:  # the store itself failed: nothing left to monitor
                if not self.closed:
                    self.mark_failed(f"store failed: {e}")
                return

    # -- the data path ---------------------------------------------------------------------------

    def _receive_from(self, rank: int) -> None:
        """Receive the replies of one last-stage rank until it dies, leaves or the cluster closes."""
        while not self.closed:
            epoch = self.epoch
            try:
                m, payload = self.channel.recv(rank)
            except RuntimeError as e:
                if not self.closed:
                    self.mark_failed(f"lost a last-stage rank: {str(e).splitlines()[0][:160]}", epoch)
                return
            if m.op == P.STOP:
                return  # the workers acknowledged close()
            if m.epoch == self.epoch:
                with TRACE.span("deliver", "serialise", step=m.step):
                    self._deliver(rank, m, payload)

    def _deliver(self, rank: int, m: P.Message, payload: torch.Tensor) -> None:
        """File one rank's reply; the step's future resolves once every last-stage rank answered
        (one in a pipeline, all of them in tensor parallel)."""
        with self.state_lock:
            fut = self.pending.get(m.step)
            if fut is None or fut.done():
                return
            parts = self.partial.setdefault(m.step, {})
            parts[rank] = (m, payload)
            if len(parts) < len(self.exit_ranks):
                return
            del self.pending[m.step], self.partial[m.step]
        ordered = [parts[r] for r in self.exit_ranks]
        if any(pm.op == P.ERROR for pm, _ in ordered):
            text = next(bytes(pl.numpy()).decode(errors="replace") for pm, pl in ordered if pm.op == P.ERROR)
            fut.set_exception(StepError(f"a stage failed this step: {text}"))
        elif m.op == P.DONE:
            fut.set_result(None)
        else:
            shapes = [(pm.B, pm.width) if pm.T == 0 else (pm.B, pm.T, pm.width) for pm, _ in ordered]
            slices = [P.unpack(pl, [(torch.float32, sh)])[0] for (pm, pl), sh in zip(ordered, shapes)]
            fut.set_result(slices[0] if len(slices) == 1 else torch.cat(slices, dim=-1))

    def _start_receivers(self) -> None:
        for rank in self.exit_ranks:
            t = self.receivers.get(rank)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._receive_from, args=(rank,), name=f"pipeload-recv-{rank}",
                                     daemon=True)
                self.receivers[rank] = t
                t.start()

    def _send(self, m: P.Message, ranks: list[int]) -> None:
        for r in ranks:
            self.channel.send(m, r)

    def _flush_frees(self) -> None:
        while self.to_free:
            cid = self.to_free.pop()
            self._send(P.Message(P.FREE_CACHE, cache=cid, epoch=self.epoch), self.entry_ranks)

    def free_later(self, cache_id: int) -> None:
        self.to_free.append(cache_id)

    def _ensure_cache(self, cache: RemoteCache) -> None:
        if cache.created_epoch != self.epoch:
            self._send(P.Message(P.NEW_CACHE, cache=cache.id, aux=cache.initial_batch, width=cache.max_len,
                                 epoch=self.epoch),
                       self.entry_ranks)
            cache.created_epoch = self.epoch

    def submit(self, tokens: torch.Tensor, positions: torch.Tensor, cache, logit_index, spans,
               replay: bool = False) -> Future:
        """Send one FORWARD step; the future gets its logits (or None for a replayed step)."""
        root = cache.root if isinstance(cache, RemoteRows) else cache
        B, T = tokens.shape
        flags = P.IS_TOKENS | (P.HAS_CACHE if root is not None else 0) | (P.NO_HEAD if replay else 0)
        tensors = [tokens.contiguous(), positions.contiguous()]
        if logit_index is not None:
            flags |= P.HAS_LOGIT_INDEX
            tensors.append(logit_index.to(torch.int64).contiguous())
        if spans is not None:
            flags |= P.HAS_SPANS
            tensors.append(spans)
        fut: Future = Future()
        with self.send_lock:
            if self.failed_epoch == self.epoch or self.closed:
                raise Lost(self.failure or "cluster closed")
            step = next(self.steps)
            m = P.Message(P.FORWARD, step, root.id if root is not None else 0, B, T, flags, epoch=self.epoch,
                          tensors=tensors)
            if isinstance(cache, RemoteRows):
                m.row_start, m.row_stop = cache.start, cache.stop
            self.pending[step] = fut
            try:
                self._flush_frees()
                if root is not None:
                    self._ensure_cache(root)
                self._send(m, self.entry_ranks)
            except RuntimeError as e:
                self.mark_failed(f"lost a first-stage rank: {str(e).splitlines()[0][:160]}")
                raise Lost(self.failure) from None
        return fut

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache, logit_index, rows=None) -> torch.Tensor:
        """Logits of one step, computed by the cluster (rows: the RowSpans of an exact-batching
        step, see runtime/executor.py); survives the loss of nodes (re-plans, rebuilds the caches
        and re-sends the step). Raises StepError for a step a stage refused, ClusterError when
        the cluster cannot go on."""
        from .recovery import recover

        spans = _spans(rows)
        while True:
            epoch = self.epoch
            try:
                t0 = time.perf_counter()
                fut = self.submit(tokens, positions, cache, logit_index, spans)
                t1 = time.perf_counter()
                try:
                    logits = fut.result(timeout=self.step_timeout)
                    if TRACE.enabled:
                        TRACE.add("submit", "serialise", t0, t1, T=tokens.shape[1])
                        TRACE.add("wait logits", "recv", t1, time.perf_counter(), T=tokens.shape[1])
                except FutureTimeout:
                    self.mark_failed(f"no answer within {self.step_timeout:.0f} s", epoch)
                    raise Lost(self.failure) from None
            except Lost:
                recover(self, epoch)
                continue
            if cache is not None:
                root = cache.root if isinstance(cache, RemoteRows) else cache
                rows = (cache.start, cache.stop) if isinstance(cache, RemoteRows) else None
                root.log.append(("forward", tokens.clone(), positions.clone(),
                                 None if logit_index is None else logit_index.clone(), rows, spans))
            return logits

    def control(self, cache: RemoteCache, op: tuple) -> None:
        """Apply a cache operation on every stage (logged first: a replay repeats it)."""
        from .recovery import recover

        cache.log.append(op)
        epoch = self.epoch
        try:
            with self.send_lock:
                if self.failed_epoch == self.epoch:
                    raise Lost(self.failure)
                if cache.created_epoch != self.epoch:
                    return  # the cache is created (and the log replayed) on first use
                self._send(control_message(cache.id, op, self.epoch), self.entry_ranks)
        except RuntimeError as e:
            self.mark_failed(f"lost a first-stage rank: {e}", epoch)
            recover(self, epoch)
        except Lost:
            recover(self, epoch)

    def close(self, timeout: float = 5.0) -> None:
        """Tell the workers to exit, and wait (up to `timeout` s) until the last stage confirms,
        so that no thread is left inside the process group when the process ends."""
        if self.closed:
            return
        told = False
        try:
            with self.send_lock:
                if self.channel is not None and self.failed_epoch != self.epoch:
                    self._send(P.Message(P.STOP, epoch=self.epoch), self.entry_ranks)
                    told = True
        except RuntimeError:
            pass  # a worker already gone cannot be told
        if told:
            deadline = time.monotonic() + timeout
            for t in list(self.receivers.values()):
                t.join(max(0.0, deadline - time.monotonic()))
        self.closed = True
        if self.monitor_thread is not None:
            self.monitor_thread.join(timeout)
        try:
            self.store.set("shutdown", "1")
        except (RuntimeError, OSError):
            pass  # the store is gone with the process that hosted it


def control_message(cache_id: int, op: tuple, epoch: int) -> P.Message:
    """The protocol message of a logged cache operation."""
    if op[0] == "reorder":
        return P.Message(P.REORDER, cache=cache_id, epoch=epoch, tensors=[op[1].to(torch.int64)])
    if op[0] == "move_row":
        _, src, dst, length = op
        return P.Message(P.MOVE_ROW, cache=cache_id, aux=src, width=dst, row_stop=length, epoch=epoch)
    raise ValueError(f"unknown cache operation {op[0]!r}")
