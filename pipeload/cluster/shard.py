"""Tensor parallel: the shard spec of one rank and the block that runs a shard.

Every rank holds, for every layer, a contiguous range of query heads (and the key/value heads
those need: with grouped-query attention a key/value head shared by two ranks is computed by
both), a contiguous range of feed-forward columns, and a range of vocabulary rows of the head.
Ranges are proportional to the ranks' measured speeds and need not be equal (any rank count).

A shard spec is applied when a rank reads its part of the file, on the raw GGML bytes, before
any conversion: row splits (q/k/v, gate/up, output) slice whole rows, column splits (attn_output,
ffn_down) slice whole GGML blocks of every row. Splits are aligned so that the kernels see the
same integers and scales as the single process (64-row tiles of the int4 kernel, GGML blocks);
a matrix that is requantized to int8 takes its per-row scales from the whole row. The partial
outputs of attn_output and ffn_down are summed across ranks with a float32 all-reduce.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ..errors import UnsupportedModelError
from ..quant.linear import INT4_TILE_N, Linear
from ..weights.index import TensorRef, WeightsIndex
from ..weights.tensor_info import TensorInfo
from .placement import proportional_split

ROW_SPLIT = {"attn_q": "heads", "attn_k": "kv", "attn_v": "kv", "ffn_gate": "ffn", "ffn_up": "ffn", "output": "vocab"}
COL_SPLIT = {"attn_output": "heads", "ffn_down": "ffn"}


@dataclass(frozen=True)
class ShardSpec:
    """The part of every layer one tensor-parallel rank holds (ranges of heads, kv heads, columns, vocab)."""

    rank: int
    ranks: int
    heads: tuple[int, int]
    kv: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    head_dim: int

    def rows(self, kind: str) -> tuple[int, int]:
        """Row (or column) range of a matrix split by `kind` ("heads", "kv", "ffn", "vocab")."""
        a, b = getattr(self, kind)
        hd = self.head_dim if kind in ("heads", "kv") else 1
        return a * hd, b * hd

    def as_dict(self) -> dict:
        return {"rank": self.rank, "ranks": self.ranks, "heads": list(self.heads), "kv": list(self.kv),
                "ffn": list(self.ffn), "vocab": list(self.vocab), "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        return cls(d["rank"], d["ranks"], tuple(d["heads"]), tuple(d["kv"]), tuple(d["ffn"]), tuple(d["vocab"]),
                   d["head_dim"])


def _block_elems(dtype: str) -> int:
    """Elements per storage block of a tensor type (1 for plain floats)."""
    if dtype in ("F32", "F16", "BF16"):
        return 1
    return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]][0]


def _is_int4(dtype: str) -> bool:
    from ..quant.native import INT4_TYPES

    return dtype in GGMLQuantizationType.__members__ and GGMLQuantizationType[dtype] in INT4_TYPES


def split_units(index: WeightsIndex, args, native: bool) -> dict[str, int]:
    """The granularity of each split so that every shard keeps the kernels' exact layout:
    {"heads": query heads, "ffn": columns, "vocab": rows}."""
    def unit_for(names_rows: list[str], names_cols: list[str], per: int) -> int:
        unit = 1
        for name in names_rows:
            ref = index.tensor(name)
            if native and _is_int4(ref.info.dtype):
                unit = math.lcm(unit, INT4_TILE_N // math.gcd(INT4_TILE_N, per))
        for name in names_cols:
            ref = index.tensor(name)
            blk = _block_elems(ref.info.dtype)
            unit = math.lcm(unit, blk // math.gcd(blk, per))
        return unit

    heads = ffn = 1
    for i in range(args.n_layers):
        heads = math.lcm(heads, unit_for([f"blk.{i}.attn_q.weight"], [f"blk.{i}.attn_output.weight"], args.head_dim))
        ffn = math.lcm(ffn, unit_for([f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"],
                                     [f"blk.{i}.ffn_down.weight"], 1))
    vocab = unit_for(["output.weight"], [], 1)
    return {"heads": heads, "ffn": ffn, "vocab": vocab}


def make_shards(args, index: WeightsIndex, native: bool, speeds: list[float]) -> list[ShardSpec]:
    """One ShardSpec per rank, ranges in proportion to `speeds`; raises UnsupportedModelError when
    the model cannot be split over that many ranks."""
    if getattr(args, "n_kv_heads", None) is None or not hasattr(args, "ffn_dim"):
        raise UnsupportedModelError("tensor parallel supports the Llama family (llama, mistral, qwen2); "
                                    "use pipeline parallel for this architecture")
    n = len(speeds)
    units = split_units(index, args, native)

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
# Applying a spec to raw tensors


def _sliced_ref(ref: TensorRef, shape: tuple[int, ...], nbytes: int) -> TensorRef:
    info = ref.info
    return TensorRef(ref.name, TensorInfo(info.name, info.path, info.offset, nbytes, shape, info.dtype), None)


def _slice_rows(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> tuple[TensorRef, torch.Tensor]:
    n = ref.shape[0]
    rows = raw.view(n, -1)[a:b].contiguous().view(-1)
    return _sliced_ref(ref, (b - a, *ref.shape[1:]), rows.numel()), rows


def _slice_cols(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> tuple[TensorRef, torch.Tensor]:
    n, k = ref.shape
    blk = _block_elems(ref.info.dtype)
    if a % blk or b % blk:
        raise UnsupportedModelError(f"{ref.name}: columns {a}..{b} do not fall on {ref.info.dtype} block bounds")
    cols = raw.view(n, k // blk, -1)[:, a // blk:b // blk].contiguous().view(-1)
    return _sliced_ref(ref, (n, b - a), cols.numel()), cols


def _int8_columns(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> nn.Module:
    """An Int8Linear of columns a..b whose per-row scales come from the whole row (as unsharded)."""
    from ..quant import dequantize
    from ..quant.linear import Int8Linear
    from ..quant.native import int8_rows

    w = dequantize(raw, GGMLQuantizationType[ref.info.dtype], ref.shape)
    q, scale = int8_rows(w.float())
    m = Int8Linear(b - a, ref.shape[0])
    m.qweight, m.scales = q[:, a:b].contiguous(), scale
    return m


def _needs_whole_rows(ref: TensorRef, native: bool) -> bool:
    """True when a column split must be built from whole rows: the kernel format requantizes to
    int8 with one scale per row (or the int4 tiles do not fit), so slicing the bytes would change
    the scales."""
    from ..quant.native import FLOAT_TYPES, INT4_TYPES

    if not native or ref.info.dtype not in GGMLQuantizationType.__members__:
        return False
    qtype = GGMLQuantizationType[ref.info.dtype]
    if qtype in FLOAT_TYPES:
        return False
    return qtype not in INT4_TYPES or ref.shape[0] % INT4_TILE_N != 0


def apply_shard(raw: dict, spec: ShardSpec, prefix: str, native: bool, dtype: torch.dtype) -> tuple[dict, dict]:
    """(raw tensors of this rank's part, {module name: prebuilt module}) for the tensors under
    `prefix`; set the prebuilt modules, then attach the raw ones with runtime.loader.attach_weights.
    Raises UnsupportedModelError for transposed (GPT-2 style) weights or misaligned blocks."""
    from ..runtime.loader import decode_tensor

    out, built = {}, {}
    for name, (ref, data) in raw.items():
        local = name[len(prefix):] if name.startswith(prefix) else name
        module, _, leaf = local.rpartition(".")
        if module in COL_SPLIT and leaf == "weight" and _needs_whole_rows(ref, native):
            a, b = spec.rows(COL_SPLIT[module])
            built[module] = _int8_columns(ref, data, a, b)
    for name, (ref, data) in raw.items():
        if ref.transform is not None:
            raise UnsupportedModelError(f"{name}: tensor parallel needs untransposed weights (GGUF or Llama HF)")
        local = name[len(prefix):] if name.startswith(prefix) else name
        module, _, leaf = local.rpartition(".")
        if module in ROW_SPLIT:
            a, b = spec.rows(ROW_SPLIT[module])
            out[name] = _slice_rows(ref, data, a, b)
        elif module in COL_SPLIT and leaf == "bias":
            keep = spec.rank == 0  # the partial sums carry the bias once
            if module in built:
                bias = decode_tensor(ref, data, dtype)
                built[module].register_buffer("bias", bias if keep else torch.zeros_like(bias))
            else:
                out[name] = (ref, data if keep else torch.zeros_like(data))
        elif module in COL_SPLIT and module not in built:
            a, b = spec.rows(COL_SPLIT[module])
            out[name] = _slice_cols(ref, data, a, b)
        elif module not in built:
            out[name] = (ref, data)
    return out, built


def local_args(args, spec: ShardSpec):
    """ModelArgs of the shard's block: its heads, kv heads and feed-forward columns."""
    return replace(args, n_heads=spec.heads[1] - spec.heads[0], n_kv_heads=spec.kv[1] - spec.kv[0],
                   ffn_dim=spec.ffn[1] - spec.ffn[0])


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


def shard_head(model: nn.Module, spec: ShardSpec) -> None:
    """Give the model an output matrix of this rank's vocabulary rows (weights attached later)."""
    model.output = Linear(model.args.dim, spec.vocab[1] - spec.vocab[0])
