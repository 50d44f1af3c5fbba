"""Tensor parallel: how the ranks split the model, and the block that runs one rank's shard.

Every rank holds, for every layer, a contiguous range of query heads (and the key/value heads
those need: with grouped-query attention a key/value head shared by two ranks is computed by
both), a contiguous range of feed-forward columns, and a range of vocabulary rows of the head.
Ranges are proportional to the ranks' measured speeds and need not be equal (any rank count).

A rank's part is cut from the file's bytes by the block builder (runtime/sharding.py): row
splits take whole stored rows, column splits whole GGML blocks of every row, so every rank
computes on the same blocks, scales and integers as one process would. The partial outputs of
attn_output and ffn_down are summed across ranks with a float32 all-reduce.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..runtime.sharding import ShardSpec, block_elems
from ..weights.index import WeightsIndex
from .placement import proportional_split

__all__ = ["AllReduce", "ShardBlock", "ShardSpec", "make_shards", "split_units"]


def split_units(index: WeightsIndex, args) -> dict[str, int]:
    """The granularity of each split so that every column split falls on GGML block bounds:
    {"heads": query heads, "ffn": columns, "vocab": rows}."""
    def unit_for(names_cols: list[str], per: int) -> int:
        unit = 1
        for name in names_cols:
            blk = block_elems(index.tensor(name).info.dtype)
            unit = math.lcm(unit, blk // math.gcd(blk, per))
        return unit

    heads = ffn = 1
    for i in range(args.n_layers):
        heads = math.lcm(heads, unit_for([f"blk.{i}.attn_output.weight"], args.head_dim))
        ffn = math.lcm(ffn, unit_for([f"blk.{i}.ffn_down.weight"], 1))
    return {"heads": heads, "ffn": ffn, "vocab": 1}


def make_shards(args, index: WeightsIndex, speeds: list[float]) -> list[ShardSpec]:
    """One ShardSpec per rank, ranges in proportion to `speeds`; raises UnsupportedModelError when
    the model cannot be split over that many ranks."""
    if getattr(args, "n_kv_heads", None) is None or not hasattr(args, "ffn_dim"):
        raise UnsupportedModelError("tensor parallel supports the Llama family (llama, mistral, qwen2); "
                                    "use pipeline parallel for this architecture")
    n = len(speeds)
    units = split_units(index, args)

    def split(total: int, unit: int, what: str) -> list[tuple[int, int]]:
        if total % unit:
            raise UnsupportedModelError(f"{what}: {total} is not a multiple of the split unit {unit}")
        try:
            return [(a * unit, b * unit) for a, b in proportional_split(total // unit, speeds)]
        except ValueError:
            raise UnsupportedModelError(f"{what}: {total} in units of {unit} cannot be split over {n} ranks; "
                                        f"use fewer ranks or pipeline parallel") from None

    heads = split(args.n_heads, units["heads"], "query heads")
    ffn = split(args.ffn_dim, units["ffn"], "feed-forward columns")
    vocab = split(args.vocab_size, units["vocab"], "vocabulary rows")
    group = args.n_heads // args.n_kv_heads
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
        self.group = group
        self.calls = 0
        self.bytes = 0  # payload handed to all-reduce (what goes on the wire is about 2(N-1)/N of it)
        self.seconds = 0.0  # spent in all-reduces (waiting for the other ranks included)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g is None or g.size() == 1:
            return x
        t0 = time.perf_counter()
        y = x.float().contiguous()
        n, me = g.size(), g.rank()
        if y.numel() * 4 * (n - 1) <= self.EXCHANGE_BYTES:
            parts = [y if r == me else torch.empty_like(y) for r in range(n)]
            works = [g.recv([parts[r]], r, 0) for r in range(n) if r != me]
            works += [g.send([y], r, 0) for r in range(n) if r != me]
            for w in works:
                w.wait()
            y = parts[0].clone()
            for p in parts[1:]:
                y += p
        else:
            g.allreduce([y]).wait()
        self.calls += 1
        self.bytes += y.numel() * 4
        self.seconds += time.perf_counter() - t0
        return y.to(x.dtype)


class ShardBlock(nn.Module):
    """A Llama-family block over this rank's heads and columns; partial outputs are all-reduced.
    It runs the block's own attention and feed-forward (fused products, one-token attention)."""

    def __init__(self, block: nn.Module, spec: ShardSpec, full_args, reduce: AllReduce):
        super().__init__()
        self.block, self.reduce = block, reduce
        group = full_args.n_heads // full_args.n_kv_heads
        kv_of_head = [h // group - spec.kv[0] for h in range(*spec.heads)]
        n_h, n_kv = len(kv_of_head), spec.kv[1] - spec.kv[0]
        # heads that group evenly take the whole model's path; else key/value heads are expanded
        even = n_h % n_kv == 0 and kv_of_head == [j // (n_h // n_kv) for j in range(n_h)]
        self.kv_of_head = None if even else torch.tensor(kv_of_head)

    def forward(self, x: torch.Tensor, step, kv) -> torch.Tensor:
        b = self.block
        h = x + self.reduce(b.attention(b.attn_norm(x), step, kv, self.kv_of_head))
        return h + self.reduce(b.feed_forward(b.ffn_norm(h)))
