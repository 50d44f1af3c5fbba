"""The memory plan of a mixture-of-experts model whose routed experts do not all fit.

A token uses only k of the E experts of each layer, so the bytes a pass must read are the
routed experts' (k/E of the expert bytes), not the layers' size. The plan therefore keeps the
dense part of layers (attention, norms, router, shared experts: used by every token) resident
first, as the dense planner does, streams the dense parts that do not fit through the prefetch
ring, and gives the rest of the budget to the expert cache (runtime/experts.py): slots of one
expert each, filled on demand after the router has chosen.

Among the placements that fit, the plan reads least per pass: dense streamed bytes plus the
routed bytes the cache is expected to miss. That expectation assumes uniformly random routing
(the worst case for a cache: no expert more popular than another); real routers are skewed and
miss less, which the run's counters show.
"""

from __future__ import annotations

import math

from ..errors import MemoryBudgetError
from ..weights.experts import is_routed_expert
from ..weights.index import LayerGroup
from ..weights.layout import group_layout, group_layouts
from .experts import expert_geometry
from .memory import format_bytes

GUIDE_TENSORS = ("ffn_norm.weight", "ffn_gate_inp.weight")  # what guessing a layer's experts needs


def is_moe(spec) -> bool:
    """Whether a ModelSpec's layers route tokens to experts."""
    return getattr(spec.args, "n_experts", 0) > 0


def expected_union(n_experts: int, top_k: int, rows: int) -> float:
    """Expected number of distinct experts `rows` tokens route to (k of E each, uniformly)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** rows)


def routed_bytes(spec, geometry, rows: int) -> tuple[int, int]:
    """(bytes of the experts one token routes to, expected bytes of the union for `rows` tokens):
    k (resp. the expected union) times each layer's mean expert size, summed over layers."""
    a = spec.args
    per_token, per_pass = 0.0, 0.0
    for i, layer in geometry.pieces.items():
        mean = sum(geometry.expert_bytes(i, e) for e in range(len(layer))) / len(layer)
        per_token += a.top_k * mean
        per_pass += expected_union(a.n_experts, a.top_k, rows) * mean
    return int(per_token), int(per_pass)


def guide_layout(group: LayerGroup):
    """The reads of one layer's feed-forward norm and router (held for guessing when the layer streams)."""
    refs = [t for t in group.tensors if t.name.endswith(GUIDE_TENSORS) and t.name.count(".") == 3]
    return group_layout(LayerGroup(group.name, refs))


def describe_resident_experts(spec, plan) -> None:
    """Fill an all-resident plan's MoE figures (routed bytes per token and pass, expert bytes held)."""
    geometry = expert_geometry(spec)
    plan.routed_bytes_per_token, plan.routed_bytes_per_pass = routed_bytes(spec, geometry, plan.batch)
    plan.resident_expert_bytes = sum(t.info.nbytes for g in spec.index.groups.values() for t in g.tensors
                                     if is_routed_expert(t.name))
    plan.expert_total = geometry.n_experts


def _expert_materialized(spec) -> int:
    """Float32 copies one cached expert needs beside its bytes (the exact reference mode on a
    file whose experts are stored in another type), else 0."""
    ref = next(t for t in spec.index.block(0).tensors if is_routed_expert(t.name))
    if not spec.exact or ref.info.dtype == "F32":
        return 0
    return 3 * spec.args.expert_ffn_dim * spec.args.dim * 4


def make_moe_plan(spec, budget: int, everything):
    """The plan under `budget` (dense parts resident where they fit, the rest of the budget an
    expert cache), given the all-resident plan `everything` for its fixed figures; raises
    MemoryBudgetError naming the smallest budget that would do."""
    from dataclasses import replace

    from .planner import MARGIN_FRACTION, MIN_MARGIN, _materialized, spread

    a = spec.args
    geometry = expert_geometry(spec)
    dense = {name: layout.nbytes for name, layout in group_layouts(spec.index, routed_experts=False).items()
             if name != "embed"}
    guides = {f"blk.{i}": guide_layout(spec.index.block(i)).nbytes for i in range(a.n_layers)}
    materialized = {name: sum(_materialized(r, spec.exact) for r in group.tensors
                              if len(r.shape) == 2 and r.name.endswith(".weight") and not is_routed_expert(r.name))
                    for name, group in spec.index.groups.items() if name != "embed"}
    extra = _expert_materialized(spec)
    per_slot = geometry.slot_bytes + extra
    per_token, per_pass = routed_bytes(spec, geometry, everything.batch)
    min_slots = 2 * a.top_k  # one layer's experts and the next layer's guesses
    blocks = [f"blk.{i}" for i in range(a.n_layers)]
    margin = max(MIN_MARGIN, int(MARGIN_FRACTION * budget))
    candidates = []
    for k in range(len(blocks) + 1):
        for head in ([], ["head"]):
            resident = [blocks[i] for i in spread(len(blocks), k)] + head
            streamed = [g for g in blocks + ["head"] if g not in resident]
            base = replace(everything, group_bytes=dict(dense), resident=[g for g in blocks + ["head"] if g in resident],
                           streamed=streamed, slot_bytes=max((dense[g] for g in streamed), default=0),
                           margin_bytes=margin, materialized=dict(materialized), expert_slot_extra=extra,
                           expert_total=geometry.n_experts,
                           routed_bytes_per_token=per_token, routed_bytes_per_pass=per_pass, resident_expert_bytes=0,
                           guide_bytes=sum(guides[g] for g in streamed if g != "head"), notes=list(everything.notes))
            base.expert_slot_counts = geometry.carve(max(0, budget - base.predicted_peak), a.top_k, extra)
            candidates.append(base)
    fitting = [c for c in candidates if c.expert_slots >= min_slots]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.predicted_peak)
        need = smallest.predicted_peak + (min_slots - smallest.expert_slots) * per_slot
        raise MemoryBudgetError(
            f"a budget of {format_bytes(budget)} cannot hold the smallest plan for this mixture-of-experts model "
            f"({format_bytes(need)}: runtime {format_bytes(smallest.runtime_bytes)}, embeddings "
            f"{format_bytes(smallest.embed_bytes)}, KV cache {format_bytes(smallest.kv_cache_bytes)}, prefetch ring "
            f"{format_bytes(smallest.ring_bytes)}, an expert cache of at least {min_slots} experts "
            f"({format_bytes(min_slots * per_slot)})); give at least {format_bytes(need, round_up=True)}, or lower the context "
            f"(ctx) or the batch size")
    best = min(fitting, key=lambda c: (c.read_bytes_per_pass, -c.expert_slots, c.predicted_peak))
    best.notes.append(f"mixture of experts: {a.top_k} of {a.n_experts} experts per token and layer; routed experts "
                      f"are read on demand into the expert cache ({math.ceil(100 * best.expert_slots / best.expert_total)}% "
                      f"of them fit)")
    return best


def active_parameters(spec, rows: int = 1) -> int:
    """Parameters one pass of `rows` tokens computes with: all of a dense model's; for a mixture
    of experts, the routed experts only in the share the rows are expected to route to (the
    expected union of k of E per row)."""
    from ..inspect import parameter_count

    total = parameter_count(spec.index)
    if not is_moe(spec):
        return total
    a = spec.args
    experts = sum(math.prod(t.info.shape) for g in spec.index.groups.values() for t in g.tensors
                  if is_routed_expert(t.name))
    used = min(1.0, expected_union(a.n_experts, a.top_k, rows) / a.n_experts)
    return int(total - experts * (1 - used))
