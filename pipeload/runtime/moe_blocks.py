"""Building a mixture-of-experts block on the file's bytes (runtime/blocks.py calls this for
architectures with MIXTURE_OF_EXPERTS set).

The block's dense tensors (attention, norms, router, shared experts) are attached as any
block's. Its routed experts come from an ExpertSource (models/moe.py): the runtime's expert
cache (runtime/experts.py, which reads experts on demand), or, when the layer's bytes hold its
routed-expert tensors (a resident or streamed whole layer), `HeldExperts` over views of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelFileError
from ..models.moe import EXPERT_PARTS, HeldExperts, sparse_layers
from ..quant.ops import GGMLWeight
from ..weights.experts import expert_pieces, is_routed_expert
from ..weights.layout import TensorBytes


def attach_moe(block: nn.Module, spec, layer: int, source: TensorBytes, experts, where: str) -> None:
    """Point `block` (layer `layer`) at `source`'s bytes and give its SparseMoE modules their
    experts: `experts` if given, else every expert held from `source`; raises ModelFileError on
    missing, unknown or misshapen tensors."""
    from .blocks import attach

    sparse = sparse_layers(block)
    routed = {n: v for n, v in source.items() if is_routed_expert(n)}
    attach(block, {n: v for n, v in source.items() if n not in routed}, f"blk.{layer}.", spec.dtype, where, exact=spec.exact)
    if experts is None:
        if not routed:
            raise ModelFileError(f"{where}: missing the routed expert tensors (blk.{layer}.ffn_{{gate,up,down}}_exps)")
        experts = held_experts(routed, sparse[0].cfg, spec.args.dim, layer, spec.exact, where)
    for moe in sparse:
        moe.experts = experts


def held_experts(routed: TensorBytes, cfg, dim: int, layer: int, exact: bool, where: str) -> HeldExperts:
    """Every expert of a layer as GGMLWeights over views of its stored bytes (`routed`: the
    layer's routed-expert tensors); raises ModelFileError on missing experts or wrong shapes."""
    data = {ref.name: raw for ref, raw in routed.values()}
    pieces = expert_pieces([ref for ref, _ in routed.values()], cfg.n_experts, layer)
    return HeldExperts([expert_weights(p, [p[part].view(data[p[part].ref.name]) for part in EXPERT_PARTS],
                                       cfg.ffn_dim, dim, exact, where) for p in pieces])


def expert_weights(pieces: dict, raw: list[torch.Tensor], ffn_dim: int, dim: int, exact: bool,
                   where: str) -> tuple[GGMLWeight, GGMLWeight, GGMLWeight]:
    """(gate, up, down) GGMLWeights of one expert from its pieces (weights/experts.py) and their
    bytes; raises ModelFileError when a matrix is not (ffn_dim, dim) / (dim, ffn_dim)."""
    from .blocks import matrix_weight

    out = []
    for part, data in zip(EXPERT_PARTS, raw):
        ref = pieces[part].as_ref()
        want = (dim, ffn_dim) if part == "down" else (ffn_dim, dim)
        if tuple(ref.shape) != want:
            raise ModelFileError(f"{where}: expert matrix {ref.name} has shape {list(ref.shape)}, the configuration "
                                 f"implies {list(want)}")
        out.append(matrix_weight(ref, data, exact))
    return tuple(out)
