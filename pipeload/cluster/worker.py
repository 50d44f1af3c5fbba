"""`pipeload worker --join HOST:PORT --model PATH`: one node of a cluster.

Three threads:
- main: joins, then for every plan (epoch) the coordinator publishes, (re)loads its part
  (keeping the layers it already holds), reports ready and makes sure a data thread runs;
- heartbeat: writes hb/<id> every HEARTBEAT seconds and notices new epochs and shutdown;
- data: receives messages from the previous rank, runs them, sends the result on.

Every message carries the epoch of the plan it was sent under; a message of an older epoch (in
flight when a node died) is dropped. A receive or send that fails (a peer died: its connection
closes at once) is reported under errors/ so that the coordinator re-plans within a fraction of
a second; the thread then drops messages until the next epoch.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import PipeloadError
from . import auth
from . import protocol as P
from .rendezvous import (ClusterError, check_hello, fingerprint, get_json, hello, join_store, parse_address,
                         set_json, wait_key)
from .stage import Assignment, StageModel
from .trace import TRACE, trace_blocks

HEARTBEAT = 0.2


class Worker:
    def __init__(self, address: str, model_path: str | Path, memory_limit: int | None = None,
                 dtype: torch.dtype | None = None, name: str | None = None, join_timeout: float = 30.0,
                 token: str | None = None):
        host, port = parse_address(address)
        self.address, self.token = f"{host}:{port}", token
        self.store = join_store(host, port, join_timeout)
        self.beat_store = join_store(host, port, join_timeout)  # heartbeats never wait behind a blocking get
        self.model_path = Path(model_path)
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self.stage = StageModel(self.model_path, dtype, memory_limit)
        self.lock = threading.Lock()      # held while a message is computed or a plan applied
        self.epoch = 0
        self.rank = 0
        self.prev = self.next = 0
        self.world = None                 # the process group of all ranks (coordinator = 0)
        self.channel: P.Channel | None = None
        self.broken_epoch = -1            # the data path failed in this epoch: drop until the next
        self.stop = threading.Event()
        self.new_epoch = threading.Event()
        self.windows_timed = False      # the coordinator's timing windows (launch.stage_timings) were run
        self.data_thread: threading.Thread | None = None
        self.id = 0
        self.timeout = 60.0
        self.times = [0.0, 0.0, 0.0]

    # -- joining ---------------------------------------------------------------------------------

    def join(self, join_timeout: float = 30.0) -> None:
        """Say hello and wait for the welcome; raises ClusterError when refused or unanswered."""
        from .. import __version__

        self.id = self.store.add("workers", 1)
        threading.Thread(target=self._heartbeat, name="pipeload-heartbeat", daemon=True).start()
        figures = self.stage.calibrate()
        from ..runtime.memory import current_rss
        from ..runtime.probe import free_memory

        figures.update({"memory_limit": self.stage.memory_limit, "free_memory": free_memory(),
                        "rss": current_rss(), "threads": torch.get_num_threads(), "cores": os.cpu_count()})
        fp = fingerprint(self.model_path)
        my_nonce = auth.nonce()
        raw = json.dumps({**hello(self.name, fp, figures), "nonce": my_nonce, "token": self.token is not None}).encode()
        self.store.set(f"hello/{self.id}", raw)
        try:
            key, reply = wait_first(self.store, [f"challenge/{self.id}", f"welcome/{self.id}"], join_timeout)
            if key.startswith("challenge/"):  # see cluster/auth.py: check the coordinator, then prove ourselves
                reason = auth.check_challenge(self.token, self.id, my_nonce, reply)
                if reason:
                    set_json(self.store, f"proof/{self.id}", {"error": reason})
                    raise ClusterError(f"worker {self.name} will not join {self.address}: {reason}")
                set_json(self.store, f"proof/{self.id}", auth.answer(self.token, self.id, my_nonce, reply, raw))
                reply = get_json_wait(self.store, f"welcome/{self.id}", join_timeout)
        except TimeoutError:
            raise ClusterError(f"the coordinator did not answer worker {self.name} within {join_timeout:.0f} s") from None
        if "error" in reply:
            raise ClusterError(f"the coordinator at {self.address} refused worker {self.name}: {reply['error']}")
        # a refusal for a reason the coordinator could not see (it checks too; this names the side)
        reason = check_hello({"version": __version__, "fingerprint": fp, "name": self.name}, reply["version"],
                             reply["fingerprint"], False)
        if reason:
            raise ClusterError(reason)
        self.timeout = reply.get("step_timeout", self.timeout)

    # -- the main loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        """Follow the coordinator's plans until it shuts down or goes away; returns an exit code."""
        while not self.stop.is_set():
            self.new_epoch.wait(0.5)
            if self.stop.is_set():
                break
            if not self.new_epoch.is_set():
                continue
            self.new_epoch.clear()
            epoch = int(self.store.get("epoch"))
            if epoch != self.epoch:
                self._apply(epoch)
        return 0

    def _heartbeat(self) -> None:
        while not self.stop.is_set():
            try:
                store = self.beat_store
                store.set(f"hb/{self.id}", repr(time.time()))
                if self.channel is not None:  # what this worker sent, for `pipeload bench cluster`
                    r = self.stage.reduce
                    store.set(f"sent/{self.id}", f"{self.channel.bytes_sent} {self.channel.messages_sent} "
                                                 f"{r.calls} {r.bytes} {r.seconds:.6f}")
                    store.set(f"times/{self.id}", " ".join(f"{x:.6f}" for x in self.times))
                if not self.windows_timed and store.check(["windows"]):
                    self.windows_timed = True
                    threading.Thread(target=self._time_windows, name="pipeload-windows", daemon=True).start()
                if store.check(["shutdown"]):
                    self.stop.set()
                    break
                if store.check(["epoch"]) and int(store.get("epoch")) != self.epoch:
                    self.new_epoch.set()
            except (RuntimeError, OSError):  # the store (the coordinator) is gone
                self.stop.set()
                break
            time.sleep(HEARTBEAT)

    def _time_windows(self) -> None:
        """Time this stage's step in the windows the coordinator set that name this worker (see
        StageModel.window_step_seconds); the answers go to `windows/{id}`."""
        import json

        try:
            windows = json.loads(self.beat_store.get("windows").decode())
            mine = []
            for w in windows:
                if self.id in w["who"]:
                    with self.lock:
                        mine.append(self.stage.window_step_seconds(w["start"], w["seconds"]))
            self.beat_store.set(f"windows/{self.id}", json.dumps(mine))
        except (RuntimeError, OSError, ValueError):
            pass  # the coordinator goes without these figures

    def _apply(self, epoch: int) -> None:
        plan = get_json(self.store, f"plan/{epoch}")
        ranks = plan["ranks"]  # the worker ids taking part
        if self.id not in ranks:  # not part of this plan (the coordinator judged it lost): leave
            self.epoch = epoch
            self.stop.set()
            return
        with self.lock:
            part = plan["assignments"].get(str(self.id))  # None: no layers in this plan (a spare)
            try:
                figures = self.stage.assign(Assignment.from_dict(part), plan["context"], plan["batch"]) if part \
                    else {"idle": True}
                if part:
                    trace_blocks(self.stage.blocks, self.stage.model)
            except (PipeloadError, OSError, ValueError) as e:
                self.store.set(f"fatal/{self.id}", f"{type(e).__name__}: {e}")
                self.stop.set()
                raise
            self.rank = plan["rank_of"][str(self.id)]
            TRACE.label = f"{plan['mode']}-rank{self.rank}-{self.name}"
            self.timeout = plan["step_timeout"]
            if plan["mode"] == "tensor" or part is None:
                self.prev, self.next = 0, 0
            else:
                order = plan["order"]  # ranks in pipeline order
                at = order.index(self.rank)
                self.prev = order[at - 1] if at > 0 else 0
                self.next = order[at + 1] if at + 1 < len(order) else 0
        set_json(self.store, f"ready/{epoch}/{self.id}", figures)
        with self.lock:
            if self.world is None:
                self.world = dist.ProcessGroupGloo(dist.PrefixStore("world/", self.store), self.rank,
                                                   plan["world_size"], timedelta(seconds=P.IDLE_TIMEOUT_SECONDS))
                self.channel = P.Channel(self.world, plan["slot_bytes"])
                self._pong()
            started = {}
            if plan["mode"] == "tensor":
                tp = plan["tp_ranks"]
                group = dist.ProcessGroupGloo(dist.PrefixStore(f"tp/{epoch}/", self.store), tp.index(self.rank),
                                              len(tp), timedelta(seconds=self.timeout))
                self.stage.reduce.group = group  # its all-reduces are traced by AllReduce itself
                started["allreduce_seconds"] = self._time_allreduce()
                started["tp_layer_seconds"] = self.stage.time_shard_step()
            self.epoch = epoch
        if part is not None and (self.data_thread is None or not self.data_thread.is_alive()):
            self.data_thread = threading.Thread(target=self._data, name="pipeload-data", daemon=True)
            self.data_thread.start()
        set_json(self.store, f"started/{epoch}/{self.id}", started)

    def _time_allreduce(self, repeats: int = 9) -> float:
        """Median seconds of one all-reduce of a token's hidden state in the tensor-parallel group."""
        x = torch.zeros(1, 1, self.stage.args.dim)
        reduce, times = self.stage.reduce, []
        counters = reduce.calls, reduce.bytes, reduce.seconds
        for _ in range(repeats):
            t0 = time.perf_counter()
            reduce(x)
            times.append(time.perf_counter() - t0)
        reduce.calls, reduce.bytes, reduce.seconds = counters  # the counters are the steps' alone
        return sorted(times)[repeats // 2]

    def _pong(self) -> None:
        """Answer the coordinator's latency probe (it pings every rank in turn after forming)."""
        t = torch.zeros(1)
        for _ in range(int(self.store.get("ping_rounds"))):
            self.world.recv([t], 0, 1).wait()
            self.world.send([t], 0, 1).wait()

    # -- the data path ---------------------------------------------------------------------------

    def _fail(self, what: str, err: Exception) -> None:
        if self.broken_epoch == self.epoch:
            return
        self.broken_epoch = self.epoch
        self.stage.reduce.group = None  # dropping a broken collective group closes its connections
        try:
            self.beat_store.set(f"error/{self.id}", f"{self.name} (rank {self.rank}, epoch {self.epoch}) {what}: "
                                                    f"{str(err).splitlines()[0][:200]}")
            self.beat_store.add("errors", 1)
        except (RuntimeError, OSError):
            self.stop.set()

    def _data(self) -> None:
        # The output of a step is handed over while the next step computes: gloo delivers a send
        # only once the next rank has posted its receive, and waiting for that here would keep
        # this stage idle while the next one is busy (one pipeline stage at work at a time).
        sending = None
        while not self.stop.is_set():
            src = self.prev
            t0 = time.perf_counter()
            try:
                m, payload = self.channel.recv(src)
            except RuntimeError as e:  # the previous rank died (connection closed) or timed out
                sending = self._finish_send(sending)
                self._fail(f"lost rank {src}", e)
                if self.prev == src:   # wait for a plan that routes around it
                    self._wait_epoch_change()
                if self.stop.is_set():
                    return
                continue
            if m.epoch < self.epoch or self.broken_epoch == m.epoch:
                continue  # sent before the last re-plan, or the path is broken: dropped
            t1 = time.perf_counter()
            with self.lock:
                out = self._handle(m, payload)
            t2 = time.perf_counter()
            TRACE.add("step", "step", t1, t2, step=m.step, op=m.op, T=m.T)
            if out is not None:
                sending = self._finish_send(sending)  # one output in flight at a time, in order
                try:
                    sending = self.channel.send_async(out, self.next)
                except RuntimeError as e:
                    self._fail(f"lost rank {self.next}", e)
            t = self.times  # seconds waiting for input, computing, waiting for the next rank to take the output
            t[0], t[1], t[2] = t[0] + t1 - t0, t[1] + t2 - t1, t[2] + time.perf_counter() - t2
            if m.op == P.STOP:
                self._finish_send(sending)
                return

    def _finish_send(self, sending) -> None:
        """Wait until the output in flight is delivered (reporting a lost next rank); returns None."""
        if sending is not None:
            try:
                with TRACE.span("send wait", "send"):
                    sending.wait()
            except RuntimeError as e:
                self._fail(f"lost rank {self.next}", e)
        return None

    def _wait_epoch_change(self) -> None:
        epoch = self.epoch
        while self.epoch == epoch and not self.stop.is_set():
            time.sleep(0.02)

    def _handle(self, m: P.Message, payload: torch.Tensor) -> P.Message | None:
        """The message to pass on (None: nothing to send)."""
        if m.op == P.FORWARD:
            try:
                return self.stage.forward(m, payload)
            except (ValueError, RuntimeError, IndexError, KeyError) as e:
                if _is_transport_error(e):  # a collective lost a rank: no answer, the coordinator re-plans
                    self._fail("lost a tensor-parallel rank", e)
                    return None
                text = f"{type(e).__name__}: {e}".encode()[:P.SMALL_SLOT - 64]  # one message, never two
                return P.Message(P.ERROR, m.step, m.cache, epoch=m.epoch,
                                 tensors=[torch.frombuffer(bytearray(text), dtype=torch.uint8)])
        last = self.stage.assignment.head or self.next == 0
        if m.op == P.ERROR:  # a stage before this one failed this step: pass the word on
            return P.Message(P.ERROR, m.step, m.cache, epoch=m.epoch, tensors=[payload])
        if m.op == P.STOP:  # passed on; the last stage (every tensor-parallel rank) answers the coordinator
            return P.Message(P.STOP, epoch=m.epoch)
        self.stage.control(m, payload)
        if last:  # control messages end at the last stage
            return None
        return P.Message(m.op, m.step, m.cache, m.B, m.T, m.flags, m.row_start, m.row_stop, m.dtype, m.width,
                         m.aux, m.epoch, tensors=[payload] if payload.numel() else [])


def _is_transport_error(e: Exception) -> bool:
    """True for errors of the process group (a peer died or timed out), not of the computation."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text or "Connection" in text or "Timed out" in text
                                            or "pair closure" in text)


def get_json_wait(store, key: str, timeout: float) -> dict:
    return json.loads(wait_key(store, key, timeout).decode())


def wait_first(store, keys: list[str], timeout: float, poll: float = 0.05) -> tuple[str, dict]:
    """(key, JSON value) of the first of `keys` to be set; raises TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        for key in keys:
            if store.check([key]):
                return key, json.loads(store.get(key).decode())
        if time.monotonic() > deadline:
            raise TimeoutError(f"none of {keys} was set within {timeout:.0f} s")
        time.sleep(poll)


def run_worker(address: str, model_path: str, memory_limit: int | None = None, dtype: torch.dtype | None = None,
               name: str | None = None, join_timeout: float = 30.0, threads: int | None = None,
               token: str | None = None) -> int:
    """Join the cluster at `address` (proving it knows the join `token`, if any) and serve until the
    coordinator ends; returns an exit code.
    Raises ClusterError (refused, unreachable coordinator) and model loading errors."""
    if threads:
        torch.set_num_threads(threads)
    w = Worker(address, model_path, memory_limit, dtype, name, join_timeout, token=token)
    w.join(join_timeout)
    print(f"pipeload worker {w.name}: joined {address} as worker {w.id}", flush=True)
    code = w.serve()
    TRACE.dump()
    print(f"pipeload worker {w.name}: the coordinator ended the cluster", flush=True)
    return code
