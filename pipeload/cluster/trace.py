"""Per-process timelines of a cluster's decode steps, as chrome-trace JSON (Perfetto reads it).

Tracing is off unless $PIPELOAD_TRACE names a directory (`pipeload bench cluster --trace` sets
it for the coordinator and every worker). Then each process records spans -- compute per layer,
all-reduces, receives, sends, message packing, the coordinator's submit/wait/deliver -- with
`time.perf_counter()`, which on Linux is CLOCK_MONOTONIC and therefore one clock for every
process on a host: the timelines of co-hosted ranks line up, and a receive can be matched to the
send that fed it. `dump()` writes `<dir>/<label>-<pid>.json`; `bench/trace_report.py` reads the
files back and breaks every token's time down per rank and stage.

Recording a span costs about a microsecond (a tuple appended to a list); a token of the 1.1B
bench model records a few hundred, well under a millisecond of the step they describe.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TRACE", "Tracer", "trace_blocks"]

MAX_EVENTS = 2_000_000  # a long run stops recording instead of growing without bound


class Tracer:
    """Collects spans (name, category, start, end, thread, args) for one process."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.enabled = bool(directory)
        self.label = f"process-{os.getpid()}"
        self.events: list[tuple] = []
        self.seq: dict[str, int] = {}  # per-name sequence numbers (all-reduce k on every rank)

    def add(self, name: str, cat: str, t0: float, t1: float, **args) -> None:
        """Record a finished span [t0, t1] (perf_counter seconds) of this thread."""
        if self.enabled and len(self.events) < MAX_EVENTS:
            self.events.append((name, cat, t0, t1, threading.get_ident(), args))

    def next_seq(self, name: str) -> int:
        k = self.seq.get(name, 0)
        self.seq[name] = k + 1
        return k

    @contextmanager
    def span(self, name: str, cat: str, **args):
        """Record the time inside the `with` block as one span."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, cat, t0, time.perf_counter(), **args)

    def dump(self) -> Path | None:
        """Write the spans as chrome-trace JSON (`traceEvents`, microseconds on the shared
        monotonic clock) to <dir>/<label>-<pid>.json; returns the path (None when off)."""
        if not self.enabled:
            return None
        pid = os.getpid()
        threads = {tid: k for k, tid in enumerate(dict.fromkeys(e[4] for e in self.events))}
        out = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": self.label}}]
        out += [{"ph": "X", "name": name, "cat": cat, "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6, "pid": pid,
                 "tid": threads[tid], "args": args} for name, cat, t0, t1, tid, args in self.events]
        d = Path(self.directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.label}-{pid}.json"
        path.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
        return path


TRACE = Tracer(os.environ.get("PIPELOAD_TRACE"))


def trace_blocks(blocks: dict, model=None) -> None:
    """Time every block's forward (span "layer i"), and the outer model's embed and head, when
    tracing is on. Hooks only: the blocks are unchanged."""
    if not TRACE.enabled:
        return
    for i, block in blocks.items():
        if getattr(block, "_pipeload_traced", False):
            continue
        starts: list[float] = []

        def pre(_m, _args, starts=starts):
            starts.append(time.perf_counter())

        def post(_m, _args, _out, i=i, starts=starts):
            TRACE.add(f"layer {i}", "layer", starts.pop(), time.perf_counter(), layer=i)

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
        block._pipeload_traced = True
    if model is not None and not getattr(model, "_pipeload_traced", False):
        for name in ("embed", "head"):
            if hasattr(model, name):
                setattr(model, name, _timed(getattr(model, name), name))
        model._pipeload_traced = True


def _timed(fn, name: str):
    def timed(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        TRACE.add(name, "layer", t0, time.perf_counter())
        return out

    return timed
