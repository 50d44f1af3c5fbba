"""The models a server offers: names, loading on first use, LRU unloading under a memory budget.

Each model has a WorkerHandle. `acquire(name)` returns a loaded handle, starting its worker if
needed; when a global budget (`total_memory`) is set and the new worker would not fit beside the
ones running, the least recently used idle workers are stopped first. A worker's footprint is
its measured peak RSS once it has run; before that, its own `memory_limit`, or the size of its
files plus the RSS of an empty worker process (measured by the first worker that starts). A worker that dies is restarted in the
background after a short pause (its in-flight requests get 503s).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .errors import APIError, unavailable
from .handle import ModelSpec, WorkerHandle


def parse_model_specs(models: list[str], memory_limit: int | None = None) -> list[ModelSpec]:
    """ModelSpecs from `path` or `name=path` arguments (name: the file name without .gguf).

    Raises ModelFileError for a missing path, ValueError for a duplicate or empty name."""
    specs: dict[str, ModelSpec] = {}
    for arg in models:
        name, sep, path = arg.partition("=")
        if not sep:
            name, path = "", arg
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelFileError(f"model {arg!r}: {p} does not exist")
        name = name.strip() or (p.stem if p.suffix == ".gguf" else p.name)
        if not name:
            raise ValueError(f"model {arg!r} has an empty name")
        if name in specs:
            raise ValueError(f"two models are named {name!r}: give one an alias with name=path")
        specs[name] = ModelSpec(name=name, path=p, memory_limit=memory_limit)
    return list(specs.values())


class Registry:
    """Model name -> worker; starts, stops and restarts workers."""

    def __init__(self, specs: list[ModelSpec], worker_options: dict[str, Any], total_memory: int | None = None,
                 max_queue: int = 64, restart_delay: float = 0.5):
        if not specs:
            raise ValueError("a server needs at least one model")
        self.worker_options = worker_options
        self.max_batch = worker_options["max_batch"]
        self.max_queue, self.total_memory, self.restart_delay = max_queue, total_memory, restart_delay
        self.handles = {s.name: WorkerHandle(s, worker_options, self._on_death) for s in specs}
        self._lock = asyncio.Lock()
        self._known_peak: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self.closing = False

    # -- lookup ---------------------------------------------------------------------------------

    def get(self, name: Any) -> WorkerHandle:
        """The handle of model `name`; raises APIError(404) naming the models there are."""
        handle = self.handles.get(name) if isinstance(name, str) else None
        if handle is None:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(self.handles)}",
                           param="model", code="model_not_found")
        return handle

    def check_capacity(self, handle: WorkerHandle, n: int = 1) -> None:
        """Raise APIError(429) with Retry-After if `n` more requests would overflow the model's queue."""
        limit = self.max_batch + self.max_queue
        if handle.in_flight + n > limit:
            waiting = max(0, handle.in_flight - self.max_batch)
            step = handle.stats.get("step_seconds") or 0.1
            retry = max(1, math.ceil(step * 32 * (1 + waiting / self.max_batch)))
            raise APIError(429, f"model {handle.name!r} is busy: {handle.in_flight} requests in flight, the limit "
                           f"is {limit} (--max-batch {self.max_batch} + --max-queue {self.max_queue}); retry later",
                           code="queue_full", headers={"Retry-After": str(min(retry, 60))})

    # -- loading --------------------------------------------------------------------------------

    async def acquire(self, name: Any) -> WorkerHandle:
        """A loaded handle for `name`, starting its worker if needed; raises APIError (404, 503)."""
        handle = self.get(name)
        handle.last_used = time.time()
        if self.closing:
            raise unavailable("the server is shutting down", 5, code="shutting_down")
        if handle.state == "loaded":
            return handle
        async with self._lock:
            if handle.state != "loaded":
                await self._make_room(handle)
                await handle.start()
                self._known_peak[handle.name] = handle.stats.get("peak_rss", 0)
        return handle

    def footprint(self, handle: WorkerHandle) -> int:
        """Bytes a worker holds (measured peak RSS) or is expected to hold once loaded."""
        measured = max(handle.stats.get("peak_rss") or 0, self._known_peak.get(handle.name, 0))
        if measured:
            return measured
        if handle.spec.memory_limit:
            return handle.spec.memory_limit
        empty = max((h.baseline_rss for h in self.handles.values()), default=0)  # 0 until a worker started
        return handle.spec.file_bytes + empty

    async def _make_room(self, handle: WorkerHandle) -> None:
        if self.total_memory is None:
            return
        need = self.footprint(handle)
        if need > self.total_memory:
            raise unavailable(f"model {handle.name!r} needs about {need / 2**20:.0f} MiB, more than the server's "
                              f"memory budget of {self.total_memory / 2**20:.0f} MiB (--total-memory)", 60,
                              code="memory_budget")
        others = [h for h in self.handles.values() if h is not handle and h.state in ("loaded", "loading")]
        used = sum(self.footprint(h) for h in others)
        for victim in sorted((h for h in others if h.in_flight == 0 and h.state == "loaded"),
                             key=lambda h: h.last_used):
            if used + need <= self.total_memory:
                break
            self._known_peak[victim.name] = max(self._known_peak.get(victim.name, 0), self.footprint(victim))
            used -= self.footprint(victim)
            await victim.stop()
        if used + need > self.total_memory:
            raise unavailable(f"model {handle.name!r} cannot be loaded now: the memory budget "
                              f"({self.total_memory / 2**20:.0f} MiB) is held by models that are serving requests",
                              5, code="memory_budget")

    def _on_death(self, handle: WorkerHandle) -> None:
        if self.closing:
            return
        task = asyncio.get_running_loop().create_task(self._restart(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, handle: WorkerHandle) -> None:
        await asyncio.sleep(self.restart_delay * min(2 ** (handle.restarts - 1), 60))
        async with self._lock:
            if handle.state != "dead" or self.closing:
                return
            try:
                await self._make_room(handle)
                await handle.start()
            except APIError as e:  # stays "error"/"dead"; the next request tries again
                handle.last_error = e.message

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every worker (after the HTTP server has drained its requests)."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(h.stop() for h in self.handles.values()), return_exceptions=True)

    def kill_all(self) -> None:
        for h in self.handles.values():
            h.kill_now()
