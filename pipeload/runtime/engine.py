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
from typing import Any

import torch
from torch import nn

from ..weights.io import IO_MODES, RangeReader
from ..weights.layout import group_layouts
from .blocks import build_block, build_outer
from .executor import Executor, ResidentLayers, layer_windows
from .kv_cache import KVCache
from .memory import PREFETCH_DEPTH
from .spec import ModelSpec, SpecView, open_model


@dataclass
class Engine(SpecView):
    """A loaded model: what it is (spec), and how to run it (executor over its layer sources)."""

    spec: ModelSpec
    model: nn.Module
    executor: Executor
    context: int = 0                 # positions a sequence may use (<= the model's context)
    plan: Any = None                 # runtime.planner.Plan when a memory budget was given
    io_mode: str | None = None       # "direct" or "buffered" when layers stream

    @property
    def stream_stats(self):
        return getattr(self.executor.layers, "stats", None)

    @property
    def expert_cache(self):
        """The runtime.experts.ExpertCache when routed experts are read on demand, else None."""
        return getattr(self.executor.layers, "experts", None)

    def close(self) -> None:
        self.executor.layers.close()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, max_len, self.dtype)


def load_layers(spec: ModelSpec, resident: list[str], streamed: list[str], io_mode: str, prefetch_depth: int = PREFETCH_DEPTH,
                read_threads: int = 2, blocks: dict[int, nn.Module] | None = None, model: nn.Module | None = None,
                token_rows_on_disk: bool = False, expert_slots: dict[int, int] | None = None,
                expert_policy: str = "lru", guess_experts: bool = True):
    """(Model with embeddings and, if "head" is resident, its head; a LayerSource) for groups
    `resident` (read now, each into a buffer of its own) and `streamed` (read ahead into the
    prefetch ring at each use). `blocks` are blocks already held (a cluster stage keeps them)
    and `model` a Model already built; both are used as they are. With token_rows_on_disk (an
    encoder's plan under a tight budget) the token table stays in the file and the rows each
    batch looks up are read then (weights/rows.py). With `expert_slots` (a mixture-of-experts
    model), the groups are the layers' dense parts and every routed expert is read on demand
    into an expert cache of those slots ({slot size: count}; runtime/experts.py); without it,
    routed experts stay part of their layers."""
    layouts = group_layouts(spec.index, routed_experts=not expert_slots)
    blocks = dict(blocks or {})
    from .streaming import StreamStats, read_resident

    cache = None
    if expert_slots:
        from .experts import ExpertCache, expert_geometry

        cache = ExpertCache(spec, expert_geometry(spec), expert_slots, expert_policy, io_mode,
                            stream_stats=StreamStats(), guess=guess_experts)
    with RangeReader() as reader:
        token_rows = None
        if token_rows_on_disk:
            from ..weights.index import LayerGroup
            from ..weights.layout import group_layout
            from ..weights.rows import DiskRows

            group = spec.index.groups["embed"]
            table = next(r for r in group.tensors if r.name == "token_embd.weight")
            token_rows = DiskRows(table)
            layouts["embed"] = group_layout(LayerGroup("embed", [r for r in group.tensors if r is not table]))
        # the embed group's bytes: the Model's embeddings, and a tied output matrix's for a streamed head
        embed = read_resident(layouts["embed"], reader, io_mode) if model is None or "head" in streamed else {}
        if model is None:
            head = read_resident(layouts["head"], reader, io_mode, embed) if "head" in resident else None
            model = build_outer(spec, embed=embed, head=head, token_rows=token_rows)
        for group in resident:
            if group.startswith("blk.") and int(group[4:]) not in blocks:
                i = int(group[4:])
                blocks[i] = build_block(spec, i, read_resident(layouts[group], reader, io_mode), experts=cache)
        if cache is not None and guess_experts:
            from .experts import router_guides

            cache.guides = router_guides(spec, blocks, reader, io_mode)
    if not streamed:
        return model, ResidentLayers(model, blocks, experts=cache)
    from .streaming import StreamedLayers

    kept = {f"blk.{i}": b for i, b in blocks.items()}
    if "head" not in streamed:
        kept["head"] = model
    return model, StreamedLayers(spec, layouts, model, kept, streamed, embed, prefetch_depth, io_mode, read_threads,
                                 experts=cache)


def load_engine(path: str | os.PathLike, dtype: torch.dtype | None = None, memory_limit: int | None = None,
                context: int | None = None, batch: int | None = None, prefetch_depth: int = PREFETCH_DEPTH,
                parallel_loading: bool = True, io_mode: str = "auto", expert_policy: str = "lru",
                guess_experts: bool = True, exact: bool = False) -> Engine:
    """Open a GGUF file or HF folder and make it runnable; raises PipeloadError subclasses.

    dtype (the activations'; None: float32) never changes the weights: they are computed on as
    the file stores them (`exact`: the reference mode, every matrix dequantized to float32).
    With memory_limit (bytes), the planner decides which layer groups stay
    resident and which stream from the file through a prefetch ring; for a mixture of experts
    that does not fit, routed experts are read on demand into an expert cache evicting by
    `expert_policy` ("lru" or "lfu"), the next layer's experts guessed ahead if `guess_experts`."""
    if expert_policy not in ("lru", "lfu"):
        raise ValueError(f"expert_policy must be 'lru' or 'lfu', got {expert_policy!r}")
    spec = open_model(path, dtype, exact)
    args = spec.args
    if batch is None:  # an encoder's pass serves many inputs; a decoder's KV cache is sized for one
        batch = 32 if spec.is_encoder else 1
    asked, context = context, min(context or args.context_length, args.context_length)
    order = [f"blk.{i}" for i in range(args.n_layers)] + ["head"]
    plan, resident, streamed = None, order, []
    if memory_limit is None:
        memory_limit = _auto_if_too_big(spec, context, batch, prefetch_depth)
    if memory_limit is not None:
        from .memory import current_rss, release_runtime_cache
        from .planner import plan_budget
        from .streaming import keep_torch_quiet

        keep_torch_quiet()
        release_runtime_cache()  # what is left of the runtime's files is what its mappings use: in RSS
        plan = plan_budget(spec, memory_limit, current_rss(), asked, batch, prefetch_depth,
                           buffered_reads=io_mode != "direct")
        context = plan.context
        resident, streamed = plan.resident, plan.streamed
    io_mode = _io_mode(io_mode, spec, plan)
    if plan is not None and io_mode == "direct":
        plan.read_cache_bytes = 0  # O_DIRECT reads leave nothing in the page cache
    model, layers = load_layers(spec, resident, streamed, io_mode, prefetch_depth, 2 if parallel_loading else 1,
                                token_rows_on_disk=plan is not None and plan.token_rows_on_disk,
                                expert_slots=plan.expert_slot_counts if plan is not None else None,
                                expert_policy=expert_policy,
                                guess_experts=guess_experts)
    executor = Executor(model, layers, args.n_layers, layer_windows(args))
    return Engine(spec=spec, model=model, executor=executor, context=context, plan=plan,
                  io_mode=io_mode if streamed or (plan is not None and plan.expert_slots) else None)


def _auto_if_too_big(spec: ModelSpec, context: int, batch: int, prefetch_depth: int) -> int | None:
    """None when the model runs resident in the memory available now; else memory_limit="auto"
    (runtime/memory.py auto_budget), with a warning: a model given no budget never thrashes."""
    import warnings

    from .memory import auto_budget, current_rss, format_bytes
    from .planner import make_plan

    need = make_plan(spec, None, current_rss(), context, batch, prefetch_depth).predicted_peak
    budget = auto_budget()
    if need <= budget:
        return None
    warnings.warn(f"the model needs {format_bytes(need)} resident (context {context}), more than the "
                  f"{format_bytes(budget)} available: it streams under memory_limit='auto' ({format_bytes(budget)}); "
                  f"give memory_limit to choose", stacklevel=3)
    return budget


def _io_mode(io_mode: str, spec: ModelSpec, plan) -> str:
    """The read mode: as asked, or ("auto") buffered for one-time reads and, when layers stream,
    whichever of O_DIRECT and buffered+DONTNEED this disk reads faster (probed now)."""
    if io_mode != "auto":
        if io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be 'auto', 'direct' or 'buffered', got {io_mode!r}")
        return io_mode
    if plan is None or not (plan.streamed or plan.expert_slots):
        return "buffered"
    from ..weights.io import probe_read_bandwidth

    first = spec.index.block(0).tensors[0].info.path
    # the probe's buffer is at most the ring, which the plan has counted and which is not allocated yet
    speeds = probe_read_bandwidth(first, nbytes=min(256 << 20, plan.ring_bytes + plan.expert_cache_bytes))
    chosen = max(speeds, key=speeds.get)
    plan.notes.append("read bandwidth probed: " + ", ".join(f"{m} {v / 1e9:.2f} GB/s" for m, v in speeds.items())
                      + f" -> {chosen}")
    return chosen
