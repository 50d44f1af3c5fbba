"""From a layer group's bytes to runnable modules: the one block builder (docs/DESIGN.md, "sources -> executor").

    build_block(spec, i, source, shard=None, into=None) -> block i of the architecture
    build_outer(spec, embed=..., head=..., shard=None, into=None) -> the Model (embeddings, head)

`source` holds the bytes read for the group (weights/layout.py: views into the buffer they
were read into). Every caller goes through these two functions: resident layers (a buffer the
block keeps), streamed layers (a reused ring slot: `into` re-points the same skeleton at the
next read's bytes), cluster stages and tensor-parallel shards (`shard`: the rank's slice of the
same bytes). The block is always the architecture's own, fused one.

What a stored tensor becomes:
- a Linear's matrix: a GGMLWeight over the bytes as stored, any type (quantized, F16, BF16,
  F32), a view: nothing copied, whatever the activations' dtype (float32 or bfloat16). New
  memory only where those bytes cannot serve: the exact reference mode (spec.exact, dtype
  "reference": every matrix dequantized to F32 once, float32 products, no integer dot products),
  and checkpoint matrices stored transposed (GPT-2's Conv1D in HF folders:
  the transpose is materialized once at load for a resident layer, once per read for a
  streamed one).
- an Embedding's table: a GGMLWeight as stored; only the rows looked up are decoded.
- vectors (norms, biases, rope tables): copied in the compute dtype (rope_* tables float32,
  attributes of the Model under their names: rope_freqs, rope_factors_long, ...).
Every tensor the module takes must be given, and every tensor given must be taken: a missing
or unknown tensor is a clear error, never a silent skip.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..errors import ModelFileError, UnsupportedModelError
from ..models.common import Embedding, Linear
from ..quant.ops import GGMLWeight
from ..weights.decode import decode_tensor
from ..weights.layout import TensorBytes
from .sharding import ShardSpec, local_args, shard_tensors, tensor_parallel_plan

FLOAT_TYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}


def build_block(spec, i: int, source: TensorBytes, shard: ShardSpec | None = None,
                into: nn.Module | None = None, experts=None) -> nn.Module:
    """Block i computing on `source`'s bytes (tensors named blk.i.*); with `shard`, this rank's
    part of it; with `into` (a block this function built before), that block re-pointed at the
    new bytes. A mixture-of-experts block takes its routed experts from `experts` (an
    ExpertSource: runtime/moe_blocks.py). Raises ModelFileError / UnsupportedModelError for missing,
    unknown or misshapen tensors, and for tensor-parallel shards of an architecture that has none."""
    prefix = f"blk.{i}."
    where = f"{spec.path}: layer {i}"
    if shard is not None:
        source = shard_tensors(source, shard, prefix, tensor_parallel_plan(spec))  # raises for no split
    block = into if into is not None else spec.arch.Block(spec.args if shard is None else local_args(spec.args, shard), i)
    if getattr(spec.arch, "MIXTURE_OF_EXPERTS", False):
        from .moe_blocks import attach_moe

        attach_moe(block, spec, i, source, experts, where)
    else:
        attach(block, source, prefix, spec.dtype, where, exact=spec.exact)
    return block


def build_outer(spec, embed: TensorBytes | None = None, head: TensorBytes | None = None,
                shard: ShardSpec | None = None, into: nn.Module | None = None, token_rows=None) -> nn.Module:
    """The architecture's Model with its embeddings from `embed` and/or its head from `head`
    (with `shard`, this rank's vocabulary rows of the output matrix); `into` re-points a Model
    built before; `token_rows` (weights/rows.py DiskRows) stands for a token table left in the
    file (`embed` then holds the other embedding tensors). Raises as build_block does."""
    model = into if into is not None else spec.new_model()
    if embed is not None:
        embed = dict(embed)
        for name in [n for n in embed if n.startswith("rope_")]:  # rope tables: float32 attributes of the Model
            attr = name.removesuffix(".weight")
            if not hasattr(model, attr):
                raise UnsupportedModelError(f"{spec.path}: tensor {name!r} is not used by this architecture as "
                                            f"pipeload implements it; this model variant is not supported")
            setattr(model, attr, decode_tensor(*embed.pop(name), torch.float32).clone())
        names = spec.embed_names
        if token_rows is not None:
            names = tuple(n for n in names if n != "token_embd")
            model.token_embd.weight = GGMLWeight(GGMLQuantizationType[token_rows.ref.info.dtype],
                                                 tuple(token_rows.ref.shape), token_rows)
            model.token_embd.dtype = spec.dtype
        attach(model, embed, "", spec.dtype, f"{spec.path}: embeddings", only=names, exact=spec.exact)
    if head is not None:
        if shard is not None:
            head = shard_tensors(head, shard, "", tensor_parallel_plan(spec))
            if into is None:
                model.output = Linear(spec.args.dim, shard.vocab[1] - shard.vocab[0])
        attach(model, head, "", spec.dtype, f"{spec.path}: head", only=spec.head_names, exact=spec.exact)
    return model


def drop_weights(module: nn.Module) -> None:
    """Let go of a module's matrices (a streamed skeleton between uses: its views point into a
    ring slot that is being refilled, and materialized copies must not outlive the layer's turn)."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.weight = None


def _slots(module: nn.Module, only: tuple[str, ...] | None) -> dict[str, tuple[str, tuple[int, ...], nn.Module, str]]:
    """{tensor name under `module`: (kind, torch shape, owner module, attribute)} of every tensor
    the module takes; kind is "matrix" (a Linear's), "table" (an Embedding's) or "vector"."""
    out = {}
    for path, sub in module.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(sub, Linear):
            out[pre + "weight"] = ("matrix", (sub.out_features, sub.in_features), sub, "weight")
            if sub.has_bias:
                out[pre + "bias"] = ("vector", (sub.out_features,), sub, "bias")
        elif isinstance(sub, Embedding):
            out[pre + "weight"] = ("table", (sub.num, sub.dim), sub, "weight")
        else:
            for leaf, p in sub.named_parameters(recurse=False):
                out[pre + leaf] = ("vector", tuple(p.shape), sub, leaf)
    return {n: s for n, s in out.items() if only is None or n.startswith(only)}


def attach(module: nn.Module, source: TensorBytes, prefix: str, dtype: torch.dtype, where: str,
           only: tuple[str, ...] | None = None, exact: bool = False) -> None:
    """Give `module` its tensors from `source` (file names = prefix + the module's own names);
    `only` limits which of the module's tensors are expected (by name prefix); `exact`: matrices
    dequantized to float32 (the reference mode). Raises
    UnsupportedModelError for tensors the module does not take, ModelFileError for missing
    tensors or wrong shapes."""
    slots = _slots(module, only)
    given = {name[len(prefix):]: value for name, value in source.items() if name.startswith(prefix)}
    unknown = sorted(set(given) - set(slots))
    if unknown:
        raise UnsupportedModelError(f"{where}: tensors {unknown} are not used by this architecture as pipeload "
                                    f"implements it; this model variant is not supported")
    missing = sorted(set(slots) - set(given))
    if missing:
        raise ModelFileError(f"{where}: missing tensors {missing}")
    for name, (ref, data) in given.items():
        kind, shape, owner, leaf = slots[name]
        if ref.shape != shape:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {list(ref.shape)}, "
                                 f"the configuration implies {list(shape)}")
        if kind == "matrix":
            owner.weight = matrix_weight(ref, data, exact)
        elif kind == "table":
            owner.weight, owner.dtype = table_weight(ref, data), dtype
        else:
            _put(owner, leaf, decode_tensor(ref, data, dtype).clone())


def _put(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        setattr(owner, leaf, value)


def materialized_type(ref, exact: bool) -> str | None:
    """The float type ("F32", "F16", "BF16") a stored matrix is materialized in by matrix_weight,
    or None when its stored bytes serve as they are. The planners count these copies."""
    stored = ref.info.dtype
    if stored in GGMLQuantizationType.__members__ and ref.transform is None and (not exact or stored == "F32"):
        return None
    return stored if stored in FLOAT_TYPES and not exact else "F32"


def matrix_weight(ref, data: torch.Tensor, exact: bool = False) -> GGMLWeight:
    """A Linear's GGMLWeight: the stored bytes themselves where they can serve, else (the exact
    reference mode, transposed or non-GGML storage) the values materialized once."""
    n, k = ref.shape
    keep = materialized_type(ref, exact)
    if keep is None:
        return GGMLWeight(GGMLQuantizationType[ref.info.dtype], (n, k), data.view(n, -1))  # (N, row bytes), a view
    values = decode_tensor(ref, data, {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[keep])
    shares = values.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
    return float_weight(values.clone() if shares else values)


def float_weight(values: torch.Tensor) -> GGMLWeight:
    """A GGMLWeight over a float32/float16/bfloat16 matrix (N, K) in memory (not copied)."""
    qtype = {torch.float32: GGMLQuantizationType.F32, torch.float16: GGMLQuantizationType.F16,
             torch.bfloat16: GGMLQuantizationType.BF16}[values.dtype]
    n = values.shape[0]
    return GGMLWeight(qtype, tuple(values.shape), values.contiguous().view(torch.uint8).view(n, -1))


def table_weight(ref, data: torch.Tensor) -> GGMLWeight:
    """An Embedding's table as stored (rows are decoded when looked up)."""
    n, k = ref.shape
    if ref.transform is None and ref.info.dtype in GGMLQuantizationType.__members__:
        return GGMLWeight(GGMLQuantizationType[ref.info.dtype], (n, k), data.view(n, -1))
    return float_weight(decode_tensor(ref, data, torch.float32))


def assign_values(module: nn.Module, values: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> None:
    """Give `module` float tensors (name = prefix + the module's own names) instead of file bytes:
    matrices and tables as GGMLWeights over those values (quantize.py runs blocks this way)."""
    slots = _slots(module, None)
    for name, value in values.items():
        local = name[len(prefix):]
        if local.startswith("rope_"):
            setattr(module, local.removesuffix(".weight"), value.float())
            continue
        kind, _, owner, leaf = slots[local]
        if kind == "vector":
            _put(owner, leaf, value.to(dtype))
        else:
            setattr(owner, leaf, float_weight(value.to(torch.float32)))
            if kind == "table":
                owner.dtype = dtype
