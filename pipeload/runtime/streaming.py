"""Streamed layers: a ring of reused, page-aligned buffers filled ahead of use by background reads.

Every pass over the weights visits the streamed groups in the same order, so reads are issued in
that order, `prefetch_depth` groups ahead, wrapping around to the next pass (the first groups of
the next token are read while the last ones and the head compute). What is read is the file's
own bytes for the group (weights/layout.py: one aligned range per GGUF layer), and the group's
module is a skeleton whose weights are re-pointed at that ring buffer (runtime/blocks.py,
`into=`): nothing is converted, allocated or garbage-collected per layer, and nothing stays in
the page cache (O_DIRECT, or buffered reads dropped with DONTNEED).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

from ..weights.io import RangeReader, aligned_buffer
from ..weights.layout import GroupLayout, TensorBytes, read_group, tensor_views
from .blocks import build_block, build_outer, drop_weights


class StreamStats:
    """Bytes read and time spent waiting for I/O or computing, per group."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds: dict[str, float] = {}
        self.wait_seconds: dict[str, float] = {}

    def as_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "read_seconds": dict(self.read_seconds),
                "wait_seconds": dict(self.wait_seconds)}


class StreamedLayers:
    """A LayerSource (see executor.py) over resident modules and groups streamed from the file."""

    def __init__(self, spec, layouts: dict[str, GroupLayout], model: nn.Module, resident: dict[str, nn.Module],
                 streamed: list[str], held: TensorBytes, prefetch_depth: int, io_mode: str, read_threads: int = 2,
                 experts=None):
        self.spec, self.layouts, self.model, self.resident, self.order = spec, layouts, model, resident, streamed
        self.held = held  # the resident embed group's views (a tied output matrix's bytes)
        self.io_mode, self.depth = io_mode, prefetch_depth
        self.experts = experts  # routed experts read on demand (runtime/experts.py), or None
        self.stats = experts.stream_stats if experts is not None else StreamStats()
        self.skeletons: dict[str, nn.Module] = {}  # built at a group's first use, re-pointed afterwards
        span = max((layouts[g].nbytes for g in streamed), default=0)
        self.slots = [aligned_buffer(span) for _ in range(prefetch_depth + 1)] if streamed else []
        self.free: deque[int] = deque(range(len(self.slots)))
        self.pending: deque[tuple[str, int, Future]] = deque()  # reads in flight, in pass order
        self.in_use: dict[str, int] = {}
        self.next = 0  # index in self.order of the next group to read
        self.reader = RangeReader()
        self.layer_pool = ThreadPoolExecutor(prefetch_depth, thread_name_prefix="pipeload-prefetch")
        self.chunk_pool = ThreadPoolExecutor(read_threads, thread_name_prefix="pipeload-read") if read_threads > 1 else None

    def _module(self, group: str, views: TensorBytes) -> nn.Module:
        into = self.skeletons.get(group)
        if group == "head":
            module = build_outer(self.spec, head=views, into=into)
        else:
            module = build_block(self.spec, int(group[4:]), views, into=into, experts=self.experts)
        self.skeletons[group] = module
        return module

    # -- reading ahead ---------------------------------------------------------------------------

    def _read(self, group: str, slot: int) -> None:
        layout = self.layouts[group]
        t0 = time.perf_counter()
        read_group(layout, self.slots[slot], self.reader, self.io_mode, self.chunk_pool)
        with self.stats.lock:
            self.stats.bytes_read += layout.nbytes
            self.stats.read_seconds[group] = self.stats.read_seconds.get(group, 0.0) + time.perf_counter() - t0

    def _fill(self) -> None:
        while self.free and self.order and len(self.pending) < self.depth:
            group = self.order[self.next]
            self.next = (self.next + 1) % len(self.order)
            slot = self.free.popleft()
            self.pending.append((group, slot, self.layer_pool.submit(self._read, group, slot)))

    def _resync(self, group: str) -> None:
        """Drop reads that are not for `group` (a pass was cut short) and restart from it."""
        while self.pending:
            _, slot, fut = self.pending.popleft()
            fut.result()
            self.free.append(slot)
        self.next = self.order.index(group)

    def _take(self, group: str) -> nn.Module:
        if group in self.resident:
            return self.resident[group]
        self._fill()
        if not self.pending or self.pending[0][0] != group:
            self._resync(group)
            self._fill()
        _, slot, fut = self.pending.popleft()
        self._fill()  # the next read starts now, while this group is awaited and computes
        t0 = time.perf_counter()
        fut.result()  # re-raises a read error here, in the computing thread
        self.stats.wait_seconds[group] = self.stats.wait_seconds.get(group, 0.0) + time.perf_counter() - t0
        module = self._module(group, tensor_views(self.layouts[group], self.slots[slot], self.held))
        self.in_use[group] = slot
        return module

    def _give_back(self, group: str) -> None:
        slot = self.in_use.pop(group, None)
        if slot is not None:
            drop_weights(self.skeletons[group])
            self.free.append(slot)
            self._fill()

    # -- LayerSource -----------------------------------------------------------------------------

    def acquire(self, i: int) -> nn.Module:
        return self._take(f"blk.{i}")

    def release(self, i: int) -> None:
        self._give_back(f"blk.{i}")

    def acquire_head(self) -> nn.Module:
        return self.model if "head" in self.resident else self._take("head")

    def release_head(self) -> None:
        self._give_back("head")

    def measure_cold_read(self) -> float:
        """Bytes/s of reading every streamed span once from a cold page cache, with the same mode,
        ring and reads in flight as streaming, but no compute: the disk's floor for one pass."""
        from ..weights.io import drop_from_page_cache

        self._resync(self.order[0]) if self.pending else None
        for path in {e.path for g in self.order for e in self.layouts[g].extents}:
            drop_from_page_cache(path)
        t0 = time.perf_counter()
        futures: deque[tuple[int, Future]] = deque()
        total = 0
        for k, group in enumerate(self.order):
            if len(futures) == len(self.slots):
                slot, fut = futures.popleft()
                fut.result()
            slot = k % len(self.slots)
            futures.append((slot, self.layer_pool.submit(self._read, group, slot)))
            total += self.layouts[group].nbytes
        for _, fut in futures:
            fut.result()
        seconds = time.perf_counter() - t0
        self.next = 0
        return total / seconds if seconds > 0 else float("inf")

    def close(self) -> None:
        for _, slot, fut in self.pending:
            fut.cancel()
        self.layer_pool.shutdown(wait=True)
        if self.chunk_pool:
            self.chunk_pool.shutdown(wait=True)
        self.reader.close()
        if self.experts is not None:
            self.experts.close()


def read_resident(layout: GroupLayout, reader: RangeReader, io_mode: str, held: TensorBytes | None = None) -> TensorBytes:
    """A group's bytes read once into a buffer of its own (kept alive by the views into it)."""
    buf = aligned_buffer(layout.nbytes)
    read_group(layout, buf, reader, io_mode)
    return tensor_views(layout, buf, held)


def keep_torch_quiet() -> None:
    """Big allocations straight from mmap and back to the OS on free (glibc), so freed activations
    do not ratchet RSS up across tokens."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 4 << 20)
    except OSError:
        pass

