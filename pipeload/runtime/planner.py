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

from ..errors import MemoryBudgetError
from ..quant import ops
from ..weights.index import LayerGroup
from ..weights.io import READ_CHUNK
from ..weights.layout import group_layout, group_layouts
from .executor import ENCODE_CHUNK, PREFILL_CHUNK
from .sharding import shard_bytes, tensor_parallel_plan
from .kv_cache import KVCache
from .memory import PREFETCH_DEPTH, format_bytes

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
    load_buffer_bytes: int = 0              # a whole layer read at load to cut a shard from (tensor parallel)
    encoder: bool = False                   # activations of encoder passes (batch inputs of context tokens)
    token_rows_on_disk: bool = False        # the token table stays in the file; looked-up rows are read
    # mixture of experts (runtime/moe_plan.py): routed experts read on demand into a cache of slots
    # slot size -> slots of that size (ExpertGeometry.carve); empty: routed experts are part of their layer groups
    expert_slot_counts: dict = field(default_factory=dict)
    expert_slot_extra: int = 0              # float32 copies per slot beside its bytes (the exact mode), else 0
    expert_total: int = 0                   # routed experts in the model (layers x experts)
    routed_bytes_per_token: int = 0         # file bytes of the top-k experts of every layer, one token
    routed_bytes_per_pass: int = 0          # the same for the batch: the expected union of its rows' experts
    resident_expert_bytes: int = 0          # bytes of routed experts inside resident layer groups
    guide_bytes: int = 0                    # routers (and norms) of streamed layers, held for guessing ahead
    read_cache_bytes: int = 0               # page cache of buffered reads in flight (weights/io.py), until dropped

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
        """Bytes read from disk per pass over the weights (layer groups; expert reads apart)."""
        return sum(self.group_bytes[g] for g in self.streamed)

    @property
    def expert_slots(self) -> int:
        return sum(self.expert_slot_counts.values())

    @property
    def expert_cache_bytes(self) -> int:
        return sum((size + self.expert_slot_extra) * n for size, n in self.expert_slot_counts.items())

    @property
    def expected_expert_read_bytes(self) -> int:
        """Expert bytes read per pass if routing were uniformly random (the worst case for a
        cache: no locality), the cache holding expert_slots of expert_total experts."""
        if not self.expert_slots:
            return 0
        return int(self.routed_bytes_per_pass * (1 - min(1.0, self.expert_slots / self.expert_total)))

    @property
    def read_bytes_per_pass(self) -> int:
        """Everything read from disk per pass: streamed groups plus expected expert reads."""
        return self.streamed_bytes + self.expected_expert_read_bytes

    @property
    def touched_bytes_per_pass(self) -> int:
        """Resident bytes one pass reads from memory: of resident routed experts only the ones routed."""
        if not self.routed_bytes_per_pass:
            return self.resident_weight_bytes
        cached = self.routed_bytes_per_pass if self.expert_slots else min(self.routed_bytes_per_pass,
                                                                            self.resident_expert_bytes)
        return self.resident_weight_bytes - self.resident_expert_bytes + cached

    @property
    def predicted_peak(self) -> int:
        return (self.runtime_bytes + self.resident_weight_bytes + self.ring_bytes + self.transient_bytes
                + self.load_buffer_bytes + self.expert_cache_bytes + self.guide_bytes + self.read_cache_bytes
                + self.kv_cache_bytes + self.activation_bytes + self.scratch_bytes + self.margin_bytes)

    def seconds_per_pass(self, disk_bw: float, mem_bw: float, flops: float, peak_flops: float) -> dict[str, float]:
        """The three floors of one pass over the weights (docs/DESIGN.md, "The physical limits"):
        disk, memory, compute. For a mixture of experts the disk floor is the bytes of routed
        experts a pass reads, not the layers' size."""
        return {"disk": self.read_bytes_per_pass / disk_bw if self.read_bytes_per_pass else 0.0,
                "memory": self.touched_bytes_per_pass / mem_bw, "compute": flops / peak_flops}

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) for every item of the predicted peak; they sum to predicted_peak."""
        rows = [
            ("runtime (Python, torch, libraries; measured)", self.runtime_bytes),
            ("embeddings (resident, as stored; token rows read from the file)" if self.token_rows_on_disk
             else "embeddings (resident, as stored)", self.embed_bytes),
            (f"resident layer groups ({len(self.resident)}, file bytes)", self.resident_layer_bytes),
            (f"prefetch ring ({self.prefetch_depth + 1} x {format_bytes(self.slot_bytes)})" if self.streamed
             else "prefetch ring (nothing streams)", self.ring_bytes),
            (f"KV cache ({self.batch} x {self.context} positions)", self.kv_cache_bytes),
            (f"activations (passes of {self.batch} inputs x {self.context} tokens, chunks of {ENCODE_CHUNK})"
             if self.encoder else f"activations (prompt chunks of {PREFILL_CHUNK} tokens)", self.activation_bytes),
            ("scratch (weight rows decoded by one product)", self.scratch_bytes),
            ("margin (allocator, stacks, objects)", self.margin_bytes),
        ]
        if self.read_cache_bytes:
            rows.insert(4, ("page cache of buffered reads in flight (each dropped once read)", self.read_cache_bytes))
        if self.transient_bytes:
            rows.insert(4, ("materialized matrices of the streamed layer computing", self.transient_bytes))
        if self.load_buffer_bytes:
            rows.insert(4, ("load buffer (a whole layer, read to cut this rank's shard)", self.load_buffer_bytes))
        if self.expert_slots:
            share = 100 * self.expert_slots / self.expert_total
            pools = " + ".join(f"{n} x {format_bytes(size)}" for size, n in sorted(self.expert_slot_counts.items()))
            rows.insert(4, (f"expert cache ({pools}: "
                            f"{share:.0f}% of the {self.expert_total} routed experts)", self.expert_cache_bytes))
            if self.guide_bytes:
                rows.insert(5, ("routers of streamed layers (guessing the next layer's experts)", self.guide_bytes))
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
        if self.routed_bytes_per_token:
            lines.append(f"  routed experts: {format_bytes(self.routed_bytes_per_token)} per token, "
                         f"{format_bytes(self.routed_bytes_per_pass)} per pass at batch {self.batch} (the experts' "
                         f"share of a pass, not the layers' size)")
        if self.expert_slots:
            share = 100 * self.expert_cache_bytes / self.budget if self.budget else 0.0
            lines.append(f"  expert cache: {format_bytes(self.expert_cache_bytes)}, {share:.0f}% of the budget; "
                         f"expected expert reads {format_bytes(self.expected_expert_read_bytes)} per pass if routing "
                         f"were uniformly random (the worst case for a cache: skewed routing reads less)")
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


def _materialized(ref, exact: bool) -> int:
    """Bytes of new memory a stored matrix becomes (runtime/blocks.py matrix_weight), else 0."""
    from .blocks import materialized_type

    kind = materialized_type(ref, exact)
    return 0 if kind is None else math.prod(ref.shape) * (4 if kind == "F32" else 2)


def read_cache_bytes(slot_bytes: int, prefetch_depth: int, read_threads: int = 2) -> int:
    """Page cache that buffered reads into the ring hold at once: a READ_CHUNK per reading thread
    when a group is read in chunks, else one group per prefetch thread (runtime/streaming.py)."""
    return read_threads * READ_CHUNK if slot_bytes > READ_CHUNK else prefetch_depth * slot_bytes


def group_sizes(spec, shard=None) -> tuple[int, dict[str, int], tuple[int, int], dict[str, int]]:
    """(embedding bytes, {group: bytes held: the file's aligned span, or a tensor-parallel rank's
    part of it}, shape (N, K) of the largest matrix computed on, {group: bytes of matrices
    materialized}) of a ModelSpec in its compute dtype."""
    layouts = group_layouts(spec.index)
    spans = {name: layout.nbytes for name, layout in layouts.items() if name != "embed"}
    materialized, largest = {}, (0, 0)
    plan = tensor_parallel_plan(spec) if shard is not None else {}
    for name, group in spec.index.groups.items():
        if name == "embed":
            continue
        prefix = f"{name}." if name.startswith("blk.") else ""
        share = {r.name: (shard_bytes(r, shard, plan, prefix) / r.info.nbytes if shard else 1.0) for r in group.tensors}
        if shard is not None:
            spans[name] = int(sum(r.info.nbytes * share[r.name] for r in group.tensors if r not in layouts[name].shared))
        matrices = [r for r in group.tensors if len(r.shape) == 2 and r.name.endswith(".weight")]
        materialized[name] = int(sum(_materialized(r, spec.exact) * share[r.name] for r in matrices))
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


def token_table_on_disk_bytes(spec) -> int | None:
    """The embed group's bytes without its token table, when an encoder may read the table's rows
    from the file instead of holding it (weights/rows.py); None when it may not (a decoder, or a
    table whose bytes another group uses, such as a tied output)."""
    group = spec.index.groups["embed"]
    table = [r for r in group.tensors if r.name == "token_embd.weight"]
    if not spec.is_encoder or len(table) != 1 or table[0].transform is not None or len(table[0].shape) != 2:
        return None
    others = LayerGroup("embed", [r for r in group.tensors if r.name != "token_embd.weight"])
    return group_layout(others).nbytes if others.tensors else 0


def encoder_activation_bytes(args, batch: int, context: int, dtype_size: int) -> int:
    """Peak activations of an encoder pass: the hidden states of `batch` inputs of `context`
    tokens held between layers, one chunk of up to ENCODE_CHUNK tokens computing through a block
    (q/k/v, attention scores, feed-forward), and the chunk's embedding rows decoded."""
    held = batch * context * args.dim * dtype_size
    t = min(batch * context, ENCODE_CHUNK)
    per_chunk = t * (8 * args.dim + 2 * args.ffn_dim) * dtype_size + t * args.n_heads * context * 4
    return held + per_chunk + t * args.dim * 4


def spread(n_total: int, n_pick: int) -> list[int]:
    """n_pick indices out of range(n_total), evenly spaced."""
    if n_pick <= 0:
        return []
    return sorted({min(n_total - 1, int((j + 0.5) * n_total / n_pick)) for j in range(n_pick)})


def make_plan(spec, budget: int | None, runtime_bytes: int, context: int, batch: int, prefetch_depth: int,
              layers: range | None = None, head: bool = True, shard=None, buffered_reads: bool = True) -> Plan:
    """Decide residency of a ModelSpec's groups under `budget`: every layer and the head, or a
    cluster stage's `layers` (and the head if it has it), or with `shard` (runtime/sharding.py) a
    tensor-parallel rank's part of them, which is held whole (shards do not stream). The
    embeddings are always resident. A whole mixture-of-experts model that does not fit reads its
    routed experts on demand (runtime/moe_plan.py); a cluster stage of one places whole layers.
    `buffered_reads`: streamed reads may go through the page cache (counted while in flight);
    False when they are known to be O_DIRECT. Raises MemoryBudgetError if the budget cannot hold
    the minimum, naming the smallest budget that would."""
    everything, candidates = _candidates(spec, budget, runtime_bytes, context, batch, prefetch_depth,
                                         layers, head, shard, buffered_reads)
    from .moe_plan import describe_resident_experts, is_moe, make_moe_plan

    whole_moe = is_moe(spec) and layers is None and shard is None
    if whole_moe:
        describe_resident_experts(spec, everything)
    if budget is None or everything.predicted_peak <= budget:
        return everything
    if whole_moe:  # routed experts are read expert by expert into a cache, not with their layers
        return make_moe_plan(spec, budget, everything)
    if shard is not None:
        raise MemoryBudgetError(
            f"a budget of {format_bytes(budget)} cannot hold this rank's tensor-parallel shard "
            f"({format_bytes(everything.predicted_peak)}: runtime {format_bytes(runtime_bytes)}, shard "
            f"{format_bytes(everything.resident_weight_bytes)}, KV cache {format_bytes(everything.kv_cache_bytes)}); "
            f"shards are held whole: give at least {format_bytes(everything.predicted_peak, round_up=True)}, "
            f"use more ranks, or pipeline parallel")
    fitting = [c for c in candidates if c.predicted_peak <= budget]
    if not fitting:
        minimum = min(candidates, key=lambda c: c.predicted_peak)
        raise MemoryBudgetError(
            f"a budget of {format_bytes(budget)} cannot hold the smallest plan for this model "
            f"({format_bytes(minimum.predicted_peak)}: runtime {format_bytes(runtime_bytes)}, embeddings "
            f"{format_bytes(minimum.embed_bytes)}, KV cache {format_bytes(minimum.kv_cache_bytes)} for {batch} x "
            f"{context} positions, prefetch ring {format_bytes(minimum.ring_bytes)}, activations "
            f"{format_bytes(minimum.activation_bytes)}); "
            f"give at least {format_bytes(minimum.predicted_peak, round_up=True)}, "
            f"or lower the context (ctx) or the batch size")
    return min(fitting, key=lambda c: (c.streamed_bytes, c.predicted_peak))


# A budget with no context asked for gets the largest of these (<= the model's) whose KV cache
# takes at most KV_SHARE of it, so that most of the budget goes to weights; else the largest that fits.
BUDGET_CONTEXTS = (4096, 2048, 1024, 512, 256, 128, 64, 32)
KV_SHARE = 0.25


def budget_context(spec, budget: int, runtime_bytes: int, batch: int, prefetch_depth: int,
                   buffered_reads: bool = True) -> tuple[int, str | None]:
    """(positions, a note for the plan or None): the context a decoder gets under `budget` when
    none is given. The model's own when everything fits with it; otherwise see BUDGET_CONTEXTS.
    Raises the planner's MemoryBudgetError (at 256 positions) when no context fits."""
    full = spec.args.context_length

    def fits(ctx: int) -> Plan | None:
        try:
            return make_plan(spec, budget, runtime_bytes, ctx, batch, prefetch_depth, buffered_reads=buffered_reads)
        except MemoryBudgetError:
            return None

    everything = make_plan(spec, None, runtime_bytes, full, batch, prefetch_depth, buffered_reads=buffered_reads)
    if everything.predicted_peak <= budget:
        return full, None
    tried = [full] * (full <= BUDGET_CONTEXTS[0]) + [c for c in BUDGET_CONTEXTS if c < full]
    plans = {c: fits(c) for c in tried}
    modest = [c for c in tried if plans[c] is not None and plans[c].kv_cache_bytes <= KV_SHARE * budget]
    chosen = modest[0] if modest else next((c for c in tried if plans[c] is not None), None)
    if chosen is None:
        make_plan(spec, budget, runtime_bytes, min(256, full), batch, prefetch_depth, buffered_reads=buffered_reads)
        raise AssertionError("make_plan accepted a plan that fits() refused")  # pragma: no cover
    why = f"its KV cache takes at most {KV_SHARE:.0%} of the budget" if modest else "the largest that fits"
    return chosen, (f"context {chosen} positions (the model's is {full}), sized to the budget: {why} "
                    f"({format_bytes(plans[chosen].kv_cache_bytes)}); give ctx to choose another")


def plan_budget(spec, budget: int | None, runtime_bytes: int, context: int | None, batch: int, prefetch_depth: int,
                buffered_reads: bool = True) -> Plan:
    """make_plan at the context asked for (at most the model's), or with none asked for and a
    budget, at the context the budget gives (budget_context, said in the plan's notes)."""
    full = spec.args.context_length
    note = None
    if context is None and budget is not None and not spec.is_encoder:
        context, note = budget_context(spec, budget, runtime_bytes, batch, prefetch_depth, buffered_reads)
    plan = make_plan(spec, budget, runtime_bytes, min(context or full, full), batch, prefetch_depth,
                     buffered_reads=buffered_reads)
    plan.notes += [note] if note else []
    return plan


def smallest_plan(spec, runtime_bytes: int, context: int, batch: int, prefetch_depth: int,
                  buffered_reads: bool = True) -> Plan:
    """The plan with the smallest predicted peak (every layer group streamed, as little held as
    the architecture allows): the least memory_limit this model runs under."""
    everything, candidates = _candidates(spec, None, runtime_bytes, context, batch, prefetch_depth,
                                         buffered_reads=buffered_reads)
    return min([everything, *candidates], key=lambda c: c.predicted_peak)


def _candidates(spec, budget: int | None, runtime_bytes: int, context: int, batch: int, prefetch_depth: int,
                layers: range | None = None, head: bool = True, shard=None,
                buffered_reads: bool = True) -> tuple[Plan, list[Plan]]:
    """(the all-resident plan, every other plan make_plan chooses from), over `layers` (all by
    default) and the head if `head`, or a tensor-parallel rank's `shard` of them."""
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
    args, dtype = spec.args, spec.dtype
    layers = range(args.n_layers) if layers is None else layers
    size = torch.empty(0, dtype=dtype).element_size()
    embed, spans, largest, materialized = group_sizes(spec, shard)
    if spec.is_encoder:  # no KV cache; hidden states of a pass instead of logits
        kv, act = 0, encoder_activation_bytes(args, batch, context, size)
    else:
        n_kv = args.n_kv_heads if shard is None else shard.kv[1] - shard.kv[0]
        kv = KVCache.bytes_needed(len(layers), batch, n_kv, args.head_dim, context, dtype)
        act = activation_bytes(args, batch, context, size)
    scratch = ops.scratch_bytes(*largest)
    order = [f"blk.{i}" for i in layers] + (["head"] if head else [])
    spans = {g: spans[g] for g in order}
    materialized = {g: materialized[g] for g in order}
    load_buffer = 0 if shard is None else max(
        (layout.nbytes for g, layout in group_layouts(spec.index).items() if g in order), default=0)
    fixed = runtime_bytes + embed + kv + act + scratch

    table_on_disk = token_table_on_disk_bytes(spec)

    def plan(resident: list[str], rows_on_disk: bool = False) -> Plan:
        resident = resident + [g for g in order if spans[g] == 0 and g not in resident]  # nothing to stream
        streamed = [g for g in order if g not in resident]
        slot = max((spans[g] for g in streamed), default=0)
        held = fixed + sum(spans[g] + materialized[g] for g in resident) + (prefetch_depth + 1) * slot * bool(streamed)
        margin = max(MIN_MARGIN, int(MARGIN_FRACTION * held))  # of what this plan holds, not of the model
        return Plan(budget, runtime_bytes, table_on_disk if rows_on_disk else embed, spans,
                    [g for g in order if g in resident], streamed, prefetch_depth, slot, kv, act, scratch, margin,
                    context, batch, materialized, load_buffer_bytes=load_buffer, encoder=spec.is_encoder,
                    token_rows_on_disk=rows_on_disk, read_cache_bytes=read_cache_bytes(slot, prefetch_depth) if streamed and buffered_reads else 0)

    everything = plan(order)
    # candidates: k blocks resident, spread evenly, with the head resident or streamed (a head larger
    # than a block also sets the size of every ring buffer, so keeping it can pay twice); an encoder
    # may also leave its token table in the file and read the rows each batch looks up
    blocks = [g for g in order if g != "head"]
    candidates = [plan([blocks[i] for i in spread(len(blocks), k)] + h, rows)
                  for k in range(len(blocks) + 1) for h in (([], ["head"]) if head else ([],))
                  for rows in ([False, True] if table_on_disk is not None else [False])]
    return everything, candidates


def budget_for_weights(spec, fraction: float, runtime_bytes: int, context: int, batch: int,
                       prefetch_depth: int = PREFETCH_DEPTH) -> int:
    """The memory_limit that leaves `fraction` of the weights' bytes for weights (resident
    groups, the prefetch ring, the embeddings held) on top of everything else the plan counts
    (runtime, activations, KV cache, scratch, margin): how `pipeload bench encoders` states
    "a budget of 25% of the weights" on a machine whose Python and torch alone are larger."""
    everything = make_plan(spec, None, runtime_bytes, context, batch, prefetch_depth)
    weights = everything.resident_weight_bytes
    return everything.predicted_peak - weights + int(fraction * weights)
