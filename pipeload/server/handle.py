"""The server's side of one model's worker process.

A `WorkerHandle` starts the process (spawned, so it shares nothing with the server but the pipe),
sends it requests from a writer thread (a long prompt never blocks the event loop), and reads its
messages on a reader thread that hands them to the event loop. Each submitted request gets an
asyncio.Queue of event dicts; when the process dies, every request still pending gets an error
item, and the registry is told so it can restart the worker.

States: unloaded -> loading -> loaded -> (unloading -> unloaded) | dead; a failed load is "error".
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import APIError, unavailable

_SPAWN = multiprocessing.get_context("spawn")


@dataclass
class ModelSpec:
    """A model the server offers: its public name, where its file is, and its own memory budget."""

    name: str
    path: Path
    memory_limit: int | None = None

    @property
    def file_bytes(self) -> int:
        """Bytes of the model's weight files on disk."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))
        return self.path.stat().st_size


@dataclass
class _Pending:
    accepted: asyncio.Future
    events: asyncio.Queue


class WorkerHandle:
    """One model's worker process, seen from the server's event loop."""

    def __init__(self, spec: ModelSpec, options: dict[str, Any], on_death: Callable[["WorkerHandle"], None]):
        self.spec, self.options, self.on_death = spec, options, on_death
        self.state = "unloaded"
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.last_error: str | None = None
        self.restarts = 0
        self.last_used = 0.0
        self.baseline_rss = 0
        self.pending: dict[str, _Pending] = {}
        self.on_events: Callable[["WorkerHandle", list[dict]], None] | None = None
        self._process = None
        self._outbox: queue.Queue | None = None
        self._ready: asyncio.Future | None = None
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (running or queued in the worker)."""
        return len(self.pending)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- process lifetime -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and wait until its model is loaded; raises APIError(503) if it fails."""
        self._loop = asyncio.get_running_loop()
        self._generation += 1
        gen = self._generation
        self.state, self.info, self.stats = "loading", {}, {}
        ours, theirs = _SPAWN.Pipe(duplex=True)
        from .worker import worker_main

        options = {**self.options, "path": str(self.spec.path), "memory_limit": self.spec.memory_limit}
        self._process = _SPAWN.Process(target=worker_main, args=(theirs, options), daemon=True,
                                       name=f"pipeload-worker-{self.name}")
        try:
            self._process.start()
        except OSError as e:
            self.state, self.last_error, self._process = "error", f"cannot start a worker process: {e}", None
            raise unavailable(f"model {self.name!r}: {self.last_error}", 5, code="model_load_failed") from e
        finally:
            theirs.close()  # so that the reader sees EOF when the worker exits
        self._outbox = queue.Queue()
        self._ready = self._loop.create_future()
        threading.Thread(target=self._write, args=(ours, self._outbox), daemon=True).start()
        threading.Thread(target=self._read, args=(ours, self._process, gen), daemon=True).start()
        try:
            await self._ready
        except APIError:
            if self.state == "loading":  # (stop() may have unloaded it meanwhile)
                self.state = "error"
            raise

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (requests still pending get an error) and wait for it."""
        process = self._process
        if process is None or self.state in ("unloaded", "unloading"):
            return
        self.state = "unloading"
        self._send(("stop",))
        self._fail_pending("the model was unloaded")
        if self._ready is not None and not self._ready.done():  # stopped while loading
            self._ready.set_exception(unavailable(f"model {self.name!r} was stopped while loading", 5))
        await asyncio.to_thread(process.join, timeout)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 5)
        self.state = "unloaded"
        self._process = None

    def kill_now(self) -> None:
        """Kill the worker at once (server exit)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, rid: str, payload: dict[str, Any], events: asyncio.Queue) -> dict[str, Any]:
        """Send a request whose event dicts will be put on `events`; returns the worker's accept info
        ({"prompt_tokens"}). Raises APIError when the worker rejects the request (bad input) or dies.
        If the worker dies later, `events` gets {"error": APIError}."""
        if self.state != "loaded":
            raise unavailable(f"model {self.name!r} is {self.state}")
        p = _Pending(accepted=asyncio.get_running_loop().create_future(), events=events)
        self.pending[rid] = p
        self._send(("submit", rid, payload))
        try:
            info = await p.accepted
        except asyncio.CancelledError:  # the client went away before the worker answered
            self.cancel(rid)
            raise
        return info

    def cancel(self, rid: str) -> None:
        """Tell the worker to drop a request (no-op if it already finished)."""
        if self.pending.pop(rid, None) is not None and self.state == "loaded":
            self._send(("cancel", rid))

    def _send(self, msg: tuple) -> None:
        if self._outbox is not None:
            self._outbox.put(msg)

    # -- threads --------------------------------------------------------------------------------

    @staticmethod
    def _write(conn, outbox: queue.Queue) -> None:
        while True:
            msg = outbox.get()
            try:
                conn.send(msg)
            except (OSError, ValueError):
                return
            if msg[0] == "stop":
                return

    def _read(self, conn, process, gen: int) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if not self._call(self._dispatch, msg, gen):
                return
        process.join(5)
        self._call(self._exited, process.exitcode, gen)
        self._call(self._outbox_closed, gen)

    def _call(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is exiting
            return False
        return True

    def _outbox_closed(self, gen: int) -> None:
        if gen == self._generation and self._outbox is not None:
            self._outbox.put(("stop",))  # ends the writer thread

    # -- messages (on the event loop) -----------------------------------------------------------

    def _dispatch(self, msg: tuple, gen: int) -> None:
        if gen != self._generation:
            return
        kind = msg[0]
        if kind == "hello":
            self.baseline_rss = msg[1]["rss"]
        elif kind == "ready":
            self.info, self.state, self.last_error = msg[1], "loaded", None
            self.stats = {"rss": msg[1]["rss"], "peak_rss": msg[1]["peak_rss"], "active": 0, "waiting": 0}
            if not self._ready.done():
                self._ready.set_result(None)
        elif kind == "load_error":
            self.last_error = msg[1]
            if not self._ready.done():
                self._ready.set_exception(unavailable(f"model {self.name!r} failed to load: {msg[1]}", 5,
                                                      code="model_load_failed"))
        elif kind in ("accepted", "rejected"):
            p = self.pending.get(msg[1])
            if p is None or p.accepted.done():
                return
            if kind == "accepted":
                p.accepted.set_result(msg[2])
            else:
                self.pending.pop(msg[1], None)
                e = msg[2]
                p.accepted.set_exception(APIError(e["status"], e["message"], param=e["param"], code=e["code"]))
        elif kind == "events":
            self.stats = msg[2]
            for ev in msg[1]:
                p = self.pending.get(ev["id"])
                if p is not None:
                    p.events.put_nowait(ev)
                    if ev["finish_reason"] is not None:
                        del self.pending[ev["id"]]
            if self.on_events is not None:
                self.on_events(self, msg[1])
        elif kind == "embedded":  # an encoder's answers: one result per request, nothing streamed
            self.stats = msg[2]
            for result in msg[1]:
                p = self.pending.pop(result["id"], None)
                if p is not None:
                    p.events.put_nowait(result)
        elif kind == "stats":
            self.stats = msg[1]

    def _exited(self, exitcode: int | None, gen: int) -> None:
        if gen != self._generation or self.state in ("unloading", "unloaded"):
            return
        how = f"was killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exited with code {exitcode}"
        message = f"the worker process of model {self.name!r} {how}"
        was_loaded = self.state == "loaded"
        self.state = "dead" if was_loaded else "error"
        self.last_error = message
        self._process = None
        if not self._ready.done():
            self._ready.set_exception(unavailable(message, 5, code="model_load_failed"))
        self._fail_pending(message)
        if was_loaded:
            self.restarts += 1
            self.on_death(self)

    def _fail_pending(self, message: str) -> None:
        error = unavailable(f"{message}; the request was not completed, send it again", 2)
        for p in self.pending.values():
            if not p.accepted.done():
                p.accepted.set_exception(error)
            else:
                p.events.put_nowait({"error": error})
        self.pending.clear()

    def describe(self) -> dict[str, Any]:
        """State and figures for /health."""
        s = self.stats
        return {"state": self.state, "path": str(self.spec.path), "pid": self.pid if self.state == "loaded" else None,
                "active": s.get("active", 0), "queued": s.get("waiting", 0), "in_flight": self.in_flight,
                "rss": s.get("rss"), "peak_rss": s.get("peak_rss"), "restarts": self.restarts,
                "finished": s.get("finished", 0), "cancelled": s.get("cancelled", 0),
                "last_error": self.last_error, "context_length": self.info.get("context_length"),
                "max_batch": self.info.get("max_batch", self.options.get("max_batch")),
                "lanes": self.info.get("lanes", 1),
                "last_used": self.last_used or None}
