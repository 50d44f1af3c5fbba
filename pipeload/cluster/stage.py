"""The part of the model one worker runs: a range of layers (pipeline) or a shard of every layer
(tensor parallel), its KV caches, and what it does with each message.

Layers are read from the worker's own copy of the model file and built by the one block
builder (runtime/blocks.py), as on one machine. When a new plan gives a worker a different range
(after a failure), it keeps the blocks it already holds and reads only the new ones; what does
not fit its memory budget streams from the file through the prefetch ring (runtime/streaming.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.common import RowSpan
from ..runtime.blocks import build_block, build_outer
from ..runtime.engine import load_layers
from ..runtime.executor import Executor, ResidentLayers, layer_windows
from ..runtime.kv_cache import KVCache, LayerView
from ..runtime.spec import open_model
from ..weights.io import RangeReader
from ..weights.layout import group_layouts
from . import protocol as P
from .shard import AllReduce, ShardBlock, ShardSpec

@dataclass(frozen=True)
class Assignment:
    """What the plan asks of one worker: layers start..stop-1, embeddings and/or head, a shard."""

    start: int
    stop: int
    embed: bool
    head: bool
    shard: ShardSpec | None = None

    def as_dict(self) -> dict:
        return {"start": self.start, "stop": self.stop, "embed": self.embed, "head": self.head,
                "shard": self.shard.as_dict() if self.shard else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Assignment":
        return cls(d["start"], d["stop"], d["embed"], d["head"], ShardSpec.from_dict(d["shard"]) if d["shard"] else None)


class StageCache(KVCache):
    """A KV cache of layers first..first+n-1 only (layer indices stay global)."""

    def __init__(self, first: int, n_layers: int, *args, **kwargs):
        super().__init__(n_layers, *args, **kwargs)
        self.first = first

    def layer(self, i: int) -> LayerView:
        return LayerView(self, i - self.first)


class StageModel:
    """One worker's weights and caches; `assign` (re)loads, `handle` runs one message."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None, memory_limit: int | None = None):
        self.spec = open_model(path, dtype)
        self.ckpt, self.arch, self.args, self.index = self.spec.checkpoint, self.spec.arch, self.spec.args, self.spec.index
        self.dtype = self.spec.dtype
        self.memory_limit = memory_limit
        self.blocks: dict[int, nn.Module] = {}
        self.model: nn.Module | None = None
        self.assignment: Assignment | None = None
        self.reduce = AllReduce()
        self.caches: dict[int, StageCache] = {}
        self.executor: Executor | None = None
        self.streamed_layers = None
        self.context = self.args.context_length

    # -- loading ---------------------------------------------------------------------------------

    def _read(self, group: str, held=None):
        from ..runtime.streaming import read_resident

        with RangeReader() as reader:
            return read_resident(group_layouts(self.index)[group], reader, "buffered", held)

    def _outer(self, a: Assignment, head: bool) -> nn.Module:
        """Embeddings (tiny to keep, so every stage holds them) and, if `head`, the head."""
        embed = self._read("embed")
        return build_outer(self.spec, embed=embed, head=self._read("head", embed) if head else None, shard=a.shard)

    def _block(self, i: int, shard: ShardSpec | None) -> nn.Module:
        block = build_block(self.spec, i, self._read(f"blk.{i}"), shard)
        return block if shard is None else ShardBlock(block, shard, self.args, self.reduce)

    def plan(self, a: Assignment, context: int, batch: int, kept: dict[int, nn.Module] | None = None):
        """The memory plan (runtime/planner.py) of assignment `a` under this worker's limit: its
        layer range and head, or its tensor-parallel shard; the process's memory is measured now,
        less the blocks in `kept` (they are counted as resident layers)."""
        from ..runtime.memory import current_rss
        from ..runtime.planner import group_sizes, make_plan

        _, spans, _, _ = group_sizes(self.spec, a.shard)
        runtime = max(0, current_rss() - sum(spans[f"blk.{i}"] for i in kept or {}))
        return make_plan(self.spec, self.memory_limit, runtime, context, batch, 2, layers=range(a.start, a.stop),
                         head=a.head, shard=a.shard)

    def assign(self, a: Assignment, context: int, batch: int) -> dict:
        """Hold what `a` asks, as the memory plan says (resident layers read now, the rest
        streamed), keeping blocks already held (same shard) that stay resident; returns figures
        {"loaded": layers read now, "kept": layers kept, "streamed": layers streamed, "seconds"}.
        Raises MemoryBudgetError when the worker's limit cannot hold the assignment."""
        import gc

        t0 = time.perf_counter()
        old = self.assignment
        same_shard = old is not None and old.shard == a.shard
        keep = {i: b for i, b in self.blocks.items() if same_shard and a.start <= i < a.stop}
        if self.streamed_layers is not None:
            self.streamed_layers.close()
        self.blocks, self.model, self.executor, self.streamed_layers, self.caches = {}, None, None, None, {}
        gc.collect()  # what the new assignment does not keep is gone before the process is measured
        self.context = min(context, self.args.context_length)
        plan = self.plan(a, self.context, batch, keep)
        resident = [int(g[4:]) for g in plan.resident if g.startswith("blk.")]
        self.blocks = {i: keep[i] if i in keep else self._block(i, a.shard) for i in resident}
        self.model = self._outer(a, head="head" in plan.resident)
        layers = ResidentLayers(self.model, self.blocks)
        if plan.streamed:
            _, layers = load_layers(self.spec, [], plan.streamed, "buffered", plan.prefetch_depth,
                                    blocks=self.blocks, model=self.model)
            self.streamed_layers = layers
        self.executor = Executor(self.model, layers, self.args.n_layers, layer_windows(self.args))
        self.assignment = a
        kept = len([i for i in resident if i in keep])
        return {"loaded": len(resident) - kept, "kept": kept, "streamed": len(plan.streamed),
                "seconds": time.perf_counter() - t0}

    # -- running ---------------------------------------------------------------------------------

    def new_cache(self, cache_id: int, batch: int, max_len: int) -> None:
        self.caches[cache_id] = self._cache(batch, max_len)

    def _cache(self, batch: int, max_len: int) -> StageCache:
        """A KV cache for this worker's layers (and its share of the key/value heads)."""
        a = self.assignment
        n_kv = a.shard.kv[1] - a.shard.kv[0] if a.shard else self.args.n_kv_heads
        return StageCache(a.start, a.stop - a.start, batch, n_kv, self.args.head_dim, max_len, self.dtype)

    @torch.inference_mode()
    def forward(self, m: P.Message, payload: torch.Tensor) -> P.Message:
        """Run this stage's part of one FORWARD step; returns the message for the next hop
        (FORWARD with the hidden state, LOGITS, or DONE for a replayed step)."""
        a = self.assignment
        width = 0 if m.flags & P.IS_TOKENS else m.width
        parts = P.unpack(payload, P.forward_specs(m, width))
        first, positions = parts[0], parts[1]
        rest = parts[2:]
        logit_index = rest.pop(0) if m.flags & P.HAS_LOGIT_INDEX else None
        spans = rest.pop(0) if m.flags & P.HAS_SPANS else None
        cache = None
        if m.flags & P.HAS_CACHE:
            if m.cache not in self.caches:
                raise ValueError(f"KV cache {m.cache} is unknown on this stage")
            cache = self.caches[m.cache]
            if m.row_stop > m.row_start:
                cache = cache.rows(m.row_start, m.row_stop)
        ex = self.executor
        rows = None if spans is None else [RowSpan(int(s), int(n)) for s, n in spans.tolist()]
        h = ex.model.embed(first, positions) if m.flags & P.IS_TOKENS else first
        if a.shard is not None:  # two all-reduces of h per layer (ShardBlock): receives posted early
            self.reduce.begin(h.shape[0] * h.shape[1] * self.args.dim, 2 * (a.stop - a.start))
        h = ex.forward_layers(h, positions, cache, a.start, a.stop, rows)
        if not a.head:
            flags = m.flags & ~P.IS_TOKENS
            return P.Message(P.FORWARD, m.step, m.cache, m.B, m.T, flags, m.row_start, m.row_stop,
                             P.DTYPE_CODES[h.dtype], h.shape[-1], epoch=m.epoch,
                             tensors=[h, positions] + [t for t in (logit_index, spans) if t is not None])
        if m.flags & P.NO_HEAD:
            return P.Message(P.DONE, m.step, m.cache, epoch=m.epoch)
        logits = ex.head(h, logit_index)
        # T = 0 says the logits are (B, V): one position per sequence
        T = 0 if logit_index is not None else m.T
        return P.Message(P.LOGITS, m.step, m.cache, m.B, T, 0, dtype=P.DTYPE_CODES[torch.float32],
                         width=logits.shape[-1], epoch=m.epoch, tensors=[logits])

    def control(self, m: P.Message, payload: torch.Tensor) -> None:
        """Apply a cache control message (NEW_CACHE, FREE_CACHE, REORDER, MOVE_ROW)."""
        if m.op == P.NEW_CACHE:
            self.new_cache(m.cache, m.aux, m.width)
        elif m.op == P.FREE_CACHE:
            self.caches.pop(m.cache, None)
        elif m.op == P.REORDER:
            index = P.unpack(payload, [(torch.int64, (payload.numel() // 8,))])[0]
            self.caches[m.cache].reorder(index.clone())
        elif m.op == P.MOVE_ROW:
            self.caches[m.cache].move_row(m.aux, m.width, m.row_stop)

    def _scratch_step(self, positions: int, with_head: bool):
        """A function that runs one one-token decode step of this worker's layers (then the head,
        if with_head) on a scratch KV cache of `positions` positions and returns its seconds."""
        a, ex = self.assignment, self.executor
        cache = self._cache(1, positions)
        h = torch.full((1, 1, self.args.dim), 0.01, dtype=self.dtype)
        index = torch.zeros(1, dtype=torch.int64)
        steps = itertools.count()

        @torch.inference_mode()
        def step() -> float:
            pos = torch.tensor([[next(steps) % positions]])
            t0 = time.perf_counter()
            out = ex.forward_layers(h, pos, cache, a.start, a.stop)
            if with_head:
                ex.head(out, index)
            return time.perf_counter() - t0

        return step

    def time_shard_step(self, repeats: int = 12) -> float | None:
        """Median seconds of one decode step through all of this rank's tensor-parallel layers,
        all-reduces included, per layer. Every rank runs it at the same moment (the all-reduces
        keep them in step), so it measures what a step pays on these nodes and this link when all
        ranks work at once. None when this rank holds no shard."""
        a = self.assignment
        if a is None or a.shard is None or self.executor is None:
            return None
        step = self._scratch_step(repeats + 2, with_head=False)
        r = self.reduce
        counters = r.calls, r.bytes, r.seconds
        times = sorted([step() for _ in range(repeats + 2)][2:])
        r.calls, r.bytes, r.seconds = counters  # the counters are the steps' alone
        return times[len(times) // 2] / (a.stop - a.start)

    def _calibration_layer(self):
        """(model, block, executor) of layer 0, loaded for timing."""
        model = build_outer(self.spec, embed=self._read("embed"))
        block = build_block(self.spec, 0, self._read("blk.0"))
        return model, block, Executor(model, ResidentLayers(model, {0: block}), self.args.n_layers,
                                      layer_windows(self.args))

    def calibrate(self, repeats: int = 16) -> dict:
        """This node's speed on the model, timed on a real layer (layer 0, loaded for the purpose)
        in a one-token decode step: {"layer_seconds", "layer_bytes", "decode_bandwidth" (bytes/s),
        "step_overhead" (seconds a stage spends per step beyond its layers: masks, rope tables,
        unpacking and packing the messages)}."""
        from ..runtime.planner import group_sizes

        _, spans, _, _ = group_sizes(self.spec)
        model, block, ex = self._calibration_layer()
        cache = KVCache(1, 1, self.args.n_kv_heads, self.args.head_dim, repeats * 3 + 12, self.dtype)
        h = torch.randn(1, 1, self.args.dim).to(self.dtype) * 0.1
        block_times, step_times, cold_times = [], [], []
        flush = _cache_flusher()
        with torch.inference_mode():
            for r in range(repeats + 2):
                pos = torch.tensor([[3 * r]])
                step = model.step_inputs(pos, None)
                cache.begin_step(pos, True)
                t0 = time.perf_counter()
                block(h, step, cache.layer(0))
                block_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                m = P.Message(P.FORWARD, 1, 1, 1, 1, P.HAS_CACHE, dtype=P.DTYPE_CODES[h.dtype], width=h.shape[-1],
                              tensors=[h, pos + 1])
                parts = P.unpack(P.pack(m.tensors), P.forward_specs(m, h.shape[-1]))
                out = ex.forward_layers(parts[0], parts[1], cache, 0, 1)
                P.pack([out, pos])
                step_times.append(time.perf_counter() - t0)
                pos = pos + 2
                step = model.step_inputs(pos, None)
                cache.begin_step(pos, True)
                flush()
                t0 = time.perf_counter()
                block(h, step, cache.layer(0))
                cold_times.append(time.perf_counter() - t0)

        def quartile(xs):  # the lower quartile: workers calibrating at once on shared cores only add time
            xs = sorted(xs[2:])
            return xs[len(xs) // 4]

        # the layer's time from memory (as in a step, after other layers); the overhead beyond the
        # layer, both timed warm so that it holds only what a stage adds
        secs = quartile(cold_times)
        overhead = quartile(step_times) - quartile(block_times)
        return {"layer_seconds": secs, "layer_bytes": spans["blk.0"], "decode_bandwidth": spans["blk.0"] / secs,
                "step_overhead": max(0.0, overhead)}

    def window_step_seconds(self, start: float, seconds: float) -> float | None:
        """Median seconds of one decode step of this pipeline stage (its layers, and the head on
        the last stage) run back to back on a scratch cache from wall-clock time `start` for
        `seconds`. The coordinator sets the windows: one per worker alone (what a stage costs
        when a single stream keeps one stage busy at a time) and one for all at once (what it
        costs when several streams keep every stage busy and co-hosted stages share the host).
        None for tensor-parallel ranks (they cannot step alone), spares, or a missed window."""
        a = self.assignment
        if a is None or a.shard is not None or self.executor is None:
            return None
        step = self._scratch_step(1024, with_head=a.head)
        while time.time() < start:
            time.sleep(min(0.01, max(0.0, start - time.time())))
        times = []
        while time.time() < start + seconds:
            times.append(step())
        times = sorted(times[1:])
        return times[len(times) // 2] if len(times) >= 3 else None


def _cache_flusher(nbytes: int = 32 << 20):
    """A function that reads `nbytes` of other memory: a layer timed again and again would
    otherwise come from the CPU caches (a small model's layer fits in them), while in a real
    step every layer follows others and comes from memory."""
    junk = torch.ones(nbytes // 4)

    def flush() -> None:
        junk.sum()

    return flush
