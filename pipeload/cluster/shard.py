"""Tensor parallel: how the ranks split the model, and the block that runs one rank's shard.

Every rank holds, for every layer, a contiguous range of query heads (and the key/value heads
those need: with grouped-query attention a key/value head shared by two ranks is computed by
both), a contiguous range of feed-forward columns, and a range of vocabulary rows of the head.
Ranges are proportional to the ranks' measured speeds and need not be equal (any rank count).

A rank's part is cut from the file's bytes by the block builder (runtime/sharding.py), as the
architecture declares (TENSOR_PARALLEL in models/*.py): row splits take whole stored rows,
column splits whole GGML blocks of every row, so every rank computes on the same blocks, scales
and integers as one process would. The partial outputs of the column-split matrices (attention
output, feed-forward down) are summed across ranks with a float32 all-reduce.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..runtime.sharding import ShardSpec, block_elems, tensor_parallel_plan
from .placement import proportional_split
from .trace import TRACE

__all__ = ["AllReduce", "ShardBlock", "ShardSpec", "make_shards", "split_units"]


def split_units(spec, plan: dict) -> dict[str, int]:
    """The granularity of each split so that every column split falls on GGML block bounds:
    {"heads": query heads, "ffn": columns, "vocab": rows}."""
    units = {"heads": 1, "kv": 1, "ffn": 1, "vocab": 1}
    for group in spec.index.groups.values():
        for ref in group.tensors:
            split = plan.get(ref.name.split(".")[-2])
            if split is None or split[0] != "columns" or not ref.name.endswith(".weight"):
                continue
            per = spec.args.head_dim if split[1] in ("heads", "kv") else 1
            blk = block_elems(ref.info.dtype)
            units[split[1]] = math.lcm(units[split[1]], blk // math.gcd(blk, per))
    return units


def make_shards(spec, speeds: list[float]) -> list[ShardSpec]:
    """One ShardSpec per rank, ranges in proportion to `speeds`; raises UnsupportedModelError when
    the architecture declares no split (or the checkpoint stores its matrices transposed), or
    the model cannot be split over that many ranks."""
    args, plan = spec.args, tensor_parallel_plan(spec)
    n = len(speeds)
    units = split_units(spec, plan)

    def split(total: int, unit: int, what: str) -> list[tuple[int, int]]:
        if total % unit:
            raise UnsupportedModelError(f"{what}: {total} is not a multiple of the split unit {unit}")
        try:
            return [(a * unit, b * unit) for a, b in proportional_split(total // unit, speeds)]
        except ValueError:
            raise UnsupportedModelError(f"{what}: {total} in units of {unit} cannot be split over {n} ranks; "
                                        f"use fewer ranks or pipeline parallel") from None

    group = args.n_heads // args.n_kv_heads
    # a key/value head may be shared by two ranks (both hold it), so query heads split freely,
    # unless a column split runs along kv heads: then whole groups of query heads
    kv_unit = units["kv"] * group if units["kv"] > 1 else 1
    heads = split(args.n_heads, math.lcm(units["heads"], kv_unit), "query heads")
    ffn = split(args.ffn_dim, units["ffn"], "feed-forward columns")
    vocab = split(args.vocab_size, units["vocab"], "vocabulary rows")
    out = []
    for r in range(n):
        h0, h1 = heads[r]
        kv = (h0 // group, (h1 - 1) // group + 1)
        out.append(ShardSpec(r, n, heads[r], kv, ffn[r], vocab[r], args.head_dim))
    return out


# ---------------------------------------------------------------------------------------------
# Running a shard


class AllReduce:
    """Sums a tensor over the tensor-parallel ranks in float32 (the group is swapped on recovery).

    A decode step's hidden state is a few KB, so an all-reduce costs its message latency, not its
    bytes: every rank sends its part to every other at once and adds the parts in rank order (one
    latency instead of a ring's 2(N-1); `pipeload bench cluster --parts allreduce` times both).
    The same order on every rank gives every rank the same bits.
    Large tensors (prompt passes) take gloo's ring, which moves fewer bytes."""

    EXCHANGE_BYTES = 256 * 1024  # up to this much sent per rank, exchange; above, the ring

    def __init__(self, group=None):
        self._group = group
        self.calls = 0
        self.bytes = 0  # payload handed to all-reduce (what goes on the wire is about 2(N-1)/N of it)
        self.seconds = 0.0  # spent in all-reduces (waiting for the other ranks included)
        self.posted = None  # (numel, parts, works): the next all-reduce's receives, posted early
        self.remaining = 0  # all-reduces left in the current step (see begin)

    @property
    def group(self):
        return self._group

    @group.setter
    def group(self, group) -> None:  # a new (or no) group: receives posted on the old one are gone
        self._group, self.posted, self.remaining = group, None, 0

    def begin(self, numel: int, count: int) -> None:
        """Say that the next `count` all-reduces (every rank makes the same calls) are of `numel`
        elements, as a step's are: each one's receives are then posted as soon as the one before
        it ended, before this rank computes its part. gloo's TCP loop thread polls a socket
        whose data has arrived for a receive not yet posted, on this rank's core, for as long as
        this rank computes (measured: 0.9 million epoll_wait calls a second, 40% of the core,
        compute per rank 0.8 of the whole model's instead of 0.5)."""
        g = self.group
        self.remaining = 0
        if g is None or g.size() == 1 or count <= 0 or numel * 4 * (g.size() - 1) > self.EXCHANGE_BYTES:
            return
        self.remaining = count
        if self.posted is None:
            self._post(numel)

    def _post(self, numel: int) -> None:
        g = self.group
        n, me = g.size(), g.rank()
        parts = [None if r == me else torch.empty(numel) for r in range(n)]
        works = [g.recv([parts[r]], r, 0) for r in range(n) if r != me]
        self.posted = (numel, parts, works)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g is None or g.size() == 1:
            return x
        t0 = time.perf_counter()
        y = x.float().contiguous()
        n, me = g.size(), g.rank()
        if y.numel() * 4 * (n - 1) <= self.EXCHANGE_BYTES:
            if self.posted is not None:
                numel, parts, works = self.posted
                self.posted = None
                if numel != y.numel():  # a step broken off between two all-reduces left receives posted
                    raise RuntimeError(f"gloo exchange: receives of {numel} elements posted, {y.numel()} sent")
                parts = [y.view(-1) if r == me else p for r, p in enumerate(parts)]
            else:
                parts = [y.view(-1) if r == me else torch.empty(y.numel()) for r in range(n)]
                works = [g.recv([parts[r]], r, 0) for r in range(n) if r != me]
            works = list(works) + [g.send([y], r, 0) for r in range(n) if r != me]
            for w in works:
                w.wait()
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            y = out.view(y.shape)
            if self.remaining > 0:
                self.remaining -= 1
                if self.remaining > 0:
                    self._post(y.numel())
        else:
            g.allreduce([y]).wait()
        self.calls += 1
        self.bytes += y.numel() * 4
        t1 = time.perf_counter()
        self.seconds += t1 - t0
        if TRACE.enabled:  # from this rank's entry until it has the sum
            TRACE.add("all-reduce", "allreduce", t0, t1, seq=TRACE.next_seq("all-reduce"))
        return y.to(x.dtype)


class ShardBlock(nn.Module):
    """A pre-norm block over this rank's heads and columns (an architecture with TENSOR_PARALLEL
    gives its Block attn_norm, attention(x, step, kv, kv_of_head), ffn_norm and feed_forward, and
    optionally post_attention_norm and post_ffw_norm); the partial outputs of attention and
    feed-forward are all-reduced, then post-normed."""

    def __init__(self, block: nn.Module, spec: ShardSpec, full_args, reduce: AllReduce):
        super().__init__()
        self.block, self.reduce = block, reduce
        self.post_norms = hasattr(block, "post_attention_norm")  # Gemma: norms of the whole (reduced) outputs
        group = full_args.n_heads // full_args.n_kv_heads
        kv_of_head = [h // group - spec.kv[0] for h in range(*spec.heads)]
        n_h, n_kv = len(kv_of_head), spec.kv[1] - spec.kv[0]
        # heads that group evenly take the whole model's path; else key/value heads are expanded
        even = n_h % n_kv == 0 and kv_of_head == [j // (n_h // n_kv) for j in range(n_h)]
        self.kv_of_head = None if even else torch.tensor(kv_of_head)

    def forward(self, x: torch.Tensor, step, kv) -> torch.Tensor:
        b = self.block
        a = self.reduce(b.attention(b.attn_norm(x), step, kv, self.kv_of_head))
        h = x + (b.post_attention_norm(a) if self.post_norms else a)
        f = self.reduce(b.feed_forward(b.ffn_norm(h)))
        return h + (b.post_ffw_norm(f) if self.post_norms else f)
