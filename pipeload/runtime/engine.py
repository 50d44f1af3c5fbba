"""Loading a model into something that computes logits: spec -> plan -> layer sources -> executor.

    open_model(path)        what the file is (runtime/spec.py)
    make_plan(spec, ...)    what stays resident and what streams under a budget (runtime/planner.py)
    load_layers(spec, ...)  resident groups read once into buffers of their own, the rest streamed
                            through the prefetch ring; every block built by runtime/blocks.py
    Executor                the loop over layers (runtime/executor.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..weights.checkpoint import Checkpoint
from ..weights.index import WeightsIndex
from ..weights.io import IO_MODES, RangeReader
from ..weights.layout import group_layouts
from .blocks import build_block, build_outer
from .executor import Executor, ResidentLayers
from .kv_cache import KVCache
from .spec import ModelSpec, open_model


@dataclass
class Engine:
    """A loaded model: what it is (spec), and how to run it (executor over its layer sources)."""

    spec: ModelSpec
    model: nn.Module
    executor: Executor
    context: int = 0                 # positions a sequence may use (<= the model's context)
    plan: Any = None                 # runtime.planner.Plan when a memory budget was given
    io_mode: str | None = None       # "direct" or "buffered" when layers stream

    @property
    def checkpoint(self) -> Checkpoint:
        return self.spec.checkpoint

    @property
    def arch(self) -> ModuleType:
        return self.spec.arch

    @property
    def args(self) -> Any:
        return self.spec.args

    @property
    def index(self) -> WeightsIndex:
        return self.spec.index

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def context_length(self) -> int:
        return self.context or self.args.context_length

    @property
    def stream_stats(self):
        return getattr(self.executor.layers, "stats", None)

    def close(self) -> None:
        self.executor.layers.close()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, max_len, self.dtype)


def load_layers(spec: ModelSpec, resident: list[str], streamed: list[str], io_mode: str, prefetch_depth: int = 2,
                read_threads: int = 2, blocks: dict[int, nn.Module] | None = None, model: nn.Module | None = None):
    """(Model with embeddings and, if "head" is resident, its head; a LayerSource) for groups
    `resident` (read now, each into a buffer of its own) and `streamed` (read ahead into the
    prefetch ring at each use). `blocks` are blocks already held (a cluster stage keeps them)
    and `model` a Model already built; both are used as they are."""
    layouts = group_layouts(spec.index)
    blocks = dict(blocks or {})
    from .streaming import read_resident

    with RangeReader() as reader:
        # the embed group's bytes: the Model's embeddings, and a tied output matrix's for a streamed head
        embed = read_resident(layouts["embed"], reader, io_mode) if model is None or "head" in streamed else {}
        if model is None:
            head = read_resident(layouts["head"], reader, io_mode, embed) if "head" in resident else None
            model = build_outer(spec, embed=embed, head=head)
        for group in resident:
            if group.startswith("blk.") and int(group[4:]) not in blocks:
                i = int(group[4:])
                blocks[i] = build_block(spec, i, read_resident(layouts[group], reader, io_mode))
    if not streamed:
        return model, ResidentLayers(model, blocks)
    from .streaming import StreamedLayers

    kept = {f"blk.{i}": b for i, b in blocks.items()}
    if "head" not in streamed:
        kept["head"] = model
    return model, StreamedLayers(spec, layouts, model, kept, streamed, embed, prefetch_depth, io_mode, read_threads)


def load_engine(path: str | os.PathLike, dtype: torch.dtype | None = None, memory_limit: int | None = None,
                context: int | None = None, batch: int = 1, prefetch_depth: int = 2, parallel_loading: bool = True,
                io_mode: str = "auto") -> Engine:
    """Open a GGUF file or HF folder and make it runnable; raises PipeloadError subclasses.

    dtype None picks float32 for all-F32 files, else bfloat16; weights are computed on as the
    file stores them. With memory_limit (bytes), the planner decides which layer groups stay
    resident and which stream from the file through a prefetch ring."""
    spec = open_model(path, dtype)
    args = spec.args
    context = min(context or args.context_length, args.context_length)
    order = [f"blk.{i}" for i in range(args.n_layers)] + ["head"]
    plan, resident, streamed = None, order, []
    if memory_limit is not None:
        from .memory import current_rss
        from .planner import make_plan
        from .streaming import keep_torch_quiet

        keep_torch_quiet()
        plan = make_plan(spec, memory_limit, current_rss(), context, batch, prefetch_depth)
        resident, streamed = plan.resident, plan.streamed
    io_mode = _io_mode(io_mode, spec, plan)
    model, layers = load_layers(spec, resident, streamed, io_mode, prefetch_depth, 2 if parallel_loading else 1)
    executor = Executor(model, layers, args.n_layers, args.sliding_window)
    return Engine(spec=spec, model=model, executor=executor, context=context, plan=plan,
                  io_mode=io_mode if streamed else None)


def _io_mode(io_mode: str, spec: ModelSpec, plan) -> str:
    """The read mode: as asked, or ("auto") buffered for one-time reads and, when layers stream,
    whichever of O_DIRECT and buffered+DONTNEED this disk reads faster (probed now)."""
    if io_mode != "auto":
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be 'auto', 'direct' or 'buffered', got {io_mode!r}")
        return io_mode
    if plan is None or not plan.streamed:
        return "buffered"
    from ..weights.io import probe_read_bandwidth

    first = spec.index.block(0).tensors[0].info.path
    # the probe's buffer is at most the ring, which the plan has counted and which is not allocated yet
    speeds = probe_read_bandwidth(first, nbytes=min(256 << 20, plan.ring_bytes))
    chosen = max(speeds, key=speeds.get)
    plan.notes.append("read bandwidth probed: " + ", ".join(f"{m} {v / 1e9:.2f} GB/s" for m, v in speeds.items())
                      + f" -> {chosen}")
    return chosen
