"""The plan: what stays resident, what streams, and where every byte of the budget goes.

    peak RSS  =  runtime (measured)  +  embeddings  +  resident layers  +  prefetch ring
                 +  KV cache  +  activations  +  scratch  +  margin

A group's size is the file's own bytes for it: its aligned read (weights/layout.py), held as
read (plus the few matrices materialized in the float32 reference mode or for transposed
checkpoints, runtime/blocks.py). If everything fits, everything is resident. Otherwise as many
layer groups as fit stay resident, spread evenly through the model so that the disk keeps
reading while resident layers compute, and the rest stream through a ring of
`prefetch_depth + 1` buffers of the largest streamed span. If not even the ring fits,
MemoryBudgetError says the smallest budget that would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType

from ..errors import MemoryBudgetError
from ..quant import ops
from ..weights.layout import group_layouts
from .executor import PREFILL_CHUNK
from .kv_cache import KVCache
from .memory import format_bytes

MARGIN_FRACTION = 0.04   # allocator fragmentation, thread stacks, Python objects
MIN_MARGIN = 48 << 20


@dataclass
class Plan:
    budget: int | None
    runtime_bytes: int                      # the process before any weight is loaded (measured)
    embed_bytes: int
    group_bytes: dict[str, int]             # "blk.i" / "head" -> bytes read: the file's aligned span
    resident: list[str]
    streamed: list[str]
    prefetch_depth: int
    slot_bytes: int                         # one ring buffer (the largest streamed span)
    kv_cache_bytes: int
    activation_bytes: int
    scratch_bytes: int
    margin_bytes: int
    context: int
    batch: int
    materialized: dict[str, int] = field(default_factory=dict)  # group -> matrices held as new memory
    notes: list[str] = field(default_factory=list)

    @property
    def ring_bytes(self) -> int:
        return (self.prefetch_depth + 1) * self.slot_bytes if self.streamed else 0

    @property
    def resident_layer_bytes(self) -> int:
        return sum(self.group_bytes[g] + self.materialized.get(g, 0) for g in self.resident)

    @property
    def resident_weight_bytes(self) -> int:
        return self.embed_bytes + self.resident_layer_bytes

    @property
    def transient_bytes(self) -> int:
        """Matrices materialized for the streamed group computing (0 unless float32 mode or transposed)."""
        return max((self.materialized.get(g, 0) for g in self.streamed), default=0)

    @property
    def streamed_bytes(self) -> int:
        """Bytes read from disk per pass over the weights."""
        return sum(self.group_bytes[g] for g in self.streamed)

    @property
    def predicted_peak(self) -> int:
        return (self.runtime_bytes + self.resident_weight_bytes + self.ring_bytes + self.transient_bytes
                + self.kv_cache_bytes + self.activation_bytes + self.scratch_bytes + self.margin_bytes)

    def seconds_per_pass(self, disk_bw: float, mem_bw: float, flops: float, peak_flops: float) -> dict[str, float]:
        """The three floors of one pass over the weights (DESIGN.md): disk, memory, compute."""
        return {"disk": self.streamed_bytes / disk_bw if self.streamed else 0.0,
                "memory": self.resident_weight_bytes / mem_bw, "compute": flops / peak_flops}

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) for every item of the predicted peak; they sum to predicted_peak."""
        rows = [
            ("runtime (Python, torch, libraries; measured)", self.runtime_bytes),
            ("embeddings (resident, as stored)", self.embed_bytes),
            (f"resident layer groups ({len(self.resident)}, file bytes)", self.resident_layer_bytes),
            (f"prefetch ring ({self.prefetch_depth + 1} x {format_bytes(self.slot_bytes)})" if self.streamed
             else "prefetch ring (nothing streams)", self.ring_bytes),
            (f"KV cache ({self.batch} x {self.context} positions)", self.kv_cache_bytes),
            (f"activations (prompt chunks of {PREFILL_CHUNK} tokens)", self.activation_bytes),
            ("scratch (weight rows decoded by one product)", self.scratch_bytes),
            ("margin (allocator, stacks, objects)", self.margin_bytes),
        ]
        if self.transient_bytes:
            rows.insert(4, ("materialized matrices of the streamed layer computing", self.transient_bytes))
        return rows

    def table(self) -> str:
        """Every byte of the budget, one line each."""
        rows = self.rows()
        width = max(len(r[0]) for r in rows)
        lines = [f"  {name:<{width}}  {format_bytes(n):>10}" for name, n in rows]
        lines.append(f"  {'predicted peak':<{width}}  {format_bytes(self.predicted_peak):>10}"
                     + (f"   (budget {format_bytes(self.budget)})" if self.budget else "   (no budget)"))
        lines.append(f"  group sizes (file bytes, 4 KiB-aligned reads): {size_runs(self.group_bytes)}")
        lines.append(f"  streamed per pass: {len(self.streamed)} groups, {format_bytes(self.streamed_bytes)}")
        if self.streamed:
            lines.append(f"  streamed groups: {compact(self.streamed)}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def compact(names: list[str]) -> str:
    """'blk.0-3, blk.7, head' style listing."""
    out, run = [], []
    for n in names + [None]:
        if n is not None and n.startswith("blk.") and run and int(n[4:]) == int(run[-1][4:]) + 1:
            run.append(n)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1][4:]}")
        run = [n] if n is not None and n.startswith("blk.") else []
        if n is not None and not n.startswith("blk."):
            out.append(n)
    return ", ".join(out)


def size_runs(sizes: dict[str, int]) -> str:
    """'blk.0-2 12.1 MB, blk.3 14.0 MB, head 8.2 MB': consecutive groups of one size together."""
    out, run = [], []
    for name, n in list(sizes.items()) + [(None, None)]:
        if run and name is not None and name.startswith("blk.") and run[-1][0].startswith("blk.") and n == run[-1][1]:
            run.append((name, n))
            continue
        if run:
            label = run[0][0] if len(run) == 1 else f"{run[0][0]}-{run[-1][0][4:]}"
            out.append(f"{label} {format_bytes(run[0][1])}")
        run = [(name, n)] if name is not None else []
    return ", ".join(out)


def _materialized(ref, dtype: torch.dtype) -> int:
    """Bytes of new memory a stored matrix becomes (runtime/blocks.py matrix_weight), else 0."""
    stored = ref.info.dtype
    as_stored = stored in GGMLQuantizationType.__members__ and (dtype != torch.float32 or stored == "F32")
    if as_stored and ref.transform is None:
        return 0
    size = 4 if dtype == torch.float32 or stored not in ("F16", "BF16") else 2
    return math.prod(ref.shape) * size


def group_sizes(spec) -> tuple[int, dict[str, int], tuple[int, int], dict[str, int]]:
    """(embedding bytes, {group: bytes read, the file's aligned span}, shape (N, K) of the largest
    matrix, {group: bytes of matrices materialized}) of a ModelSpec in its compute dtype."""
    layouts = group_layouts(spec.index)
    spans = {name: layout.nbytes for name, layout in layouts.items() if name != "embed"}
    materialized, largest = {}, (0, 0)
    for name, group in spec.index.groups.items():
        if name == "embed":
            continue
        matrices = [r for r in group.tensors if len(r.shape) == 2 and r.name.endswith(".weight")]
        materialized[name] = sum(_materialized(r, spec.dtype) for r in matrices)
        largest = max([largest, *(tuple(r.shape) for r in matrices)], key=math.prod)
    return layouts["embed"].nbytes, spans, largest, materialized


def activation_bytes(args, batch: int, context: int, dtype_size: int) -> int:
    """Peak activations of one layer over a prompt chunk, plus the logits of the last tokens."""
    t = batch * min(context, PREFILL_CHUNK)
    hidden = t * args.dim * dtype_size
    ffn = t * args.ffn_dim * dtype_size
    per_layer = 6 * hidden + 3 * ffn + 4 * t * args.dim * 4  # residual, norms, q/k/v/out, gate/up/act, fp32 norms
    attn = batch * args.n_heads * min(context, PREFILL_CHUNK) * context * 4  # scores if materialised
    return per_layer + attn + 2 * batch * args.vocab_size * 4


def spread(n_total: int, n_pick: int) -> list[int]:
    """n_pick indices out of range(n_total), evenly spaced."""
    if n_pick <= 0:
        return []
    return sorted({min(n_total - 1, int((j + 0.5) * n_total / n_pick)) for j in range(n_pick)})


def make_plan(spec, budget: int | None, runtime_bytes: int, context: int, batch: int, prefetch_depth: int) -> Plan:
    """Decide residency of a ModelSpec's groups under `budget`; raises MemoryBudgetError if the
    budget cannot hold the minimum."""
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
    args, dtype = spec.args, spec.dtype
    size = torch.empty(0, dtype=dtype).element_size()
    embed, spans, largest, materialized = group_sizes(spec)
    kv = KVCache.bytes_needed(args.n_layers, batch, args.n_kv_heads, args.head_dim, context, dtype)
    act = activation_bytes(args, batch, context, size)
    scratch = ops.scratch_bytes(*largest)
    weights = embed + sum(spans.values()) + sum(materialized.values())
    fixed = runtime_bytes + embed + kv + act + scratch
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * (fixed + weights)))
    order = [f"blk.{i}" for i in range(args.n_layers)] + ["head"]

    def plan(resident: list[str]) -> Plan:
        streamed = [g for g in order if g not in resident]
        slot = max((spans[g] for g in streamed), default=0)
        return Plan(budget, runtime_bytes, embed, spans, [g for g in order if g in resident], streamed,
                    prefetch_depth, slot, kv, act, scratch, margin, context, batch, materialized)

    everything = plan(order)
    if budget is None or everything.predicted_peak <= budget:
        return everything
    # candidates: k blocks resident, spread evenly, with the head resident or streamed (a head larger
    # than a block also sets the size of every ring buffer, so keeping it can pay twice)
    blocks = order[:-1]
    candidates = [plan([blocks[i] for i in spread(len(blocks), k)] + head)
                  for k in range(len(blocks) + 1) for head in ([], ["head"])]
    fitting = [c for c in candidates if c.predicted_peak <= budget]
    if not fitting:
        minimum = min(candidates, key=lambda c: c.predicted_peak)
        raise MemoryBudgetError(
            f"a budget of {format_bytes(budget)} cannot hold the smallest plan for this model "
            f"({format_bytes(minimum.predicted_peak)}: runtime {format_bytes(runtime_bytes)}, embeddings "
            f"{format_bytes(embed)}, KV cache {format_bytes(kv)} for {batch} x {context} positions, prefetch ring "
            f"{format_bytes(minimum.ring_bytes)}, activations {format_bytes(act)}); give at least "
            f"{format_bytes(minimum.predicted_peak)}, or lower the context (ctx) or the batch size")
    return min(fitting, key=lambda c: (c.streamed_bytes, c.predicted_peak))
