"""Turning indexed byte ranges into module weights.

Modules are built on the meta device; `attach_weights` gives them their tensors, so a weight
exists exactly once. Two ways to hold weights:
- float (dtype float32 or bfloat16 with `native=False`): every tensor decoded to `dtype`;
  float32 is the exact reference path.
- native (`native=True`, bf16 activations): quantized matrices become kernel-native packed
  linears (quant/native.py), quantized embeddings stay packed and decode only the rows looked up.
Every tensor the module expects must be in the group, and every tensor in the group must be used:
a missing or unknown tensor is a clear error, never a silent skip.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..errors import ModelFileError, UnsupportedModelError
from ..models.common import Embedding
from ..quant.linear import Linear
from ..weights.index import LayerGroup, TensorRef
from ..weights.io import RangeReader

PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
FLOAT_STORAGE = ("F32", "F16", "BF16", "F64")

RawTensors = dict[str, tuple[TensorRef, torch.Tensor]]  # GGUF name -> (where it came from, its bytes)


def put_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Attach `value` at the dotted `name` of `module`: into the buffer of that name if the owner
    has one, else as a frozen Parameter."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def ggml_type(ref: TensorRef) -> GGMLQuantizationType:
    name = ref.info.dtype
    if name not in GGMLQuantizationType.__members__:
        raise UnsupportedModelError(f"tensor {ref.name!r} has unknown type {name!r}")
    return GGMLQuantizationType[name]


def decode_tensor(ref: TensorRef, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight held by `raw` (the tensor's bytes) as `dtype`, in torch shape, transform applied."""
    info = ref.info
    plain = PLAIN_DTYPES.get(info.dtype)
    if plain is not None:
        t = raw.view(plain).view(info.shape)
    else:
        from ..quant import dequantize

        t = dequantize(raw, ggml_type(ref), info.shape, out_dtype=dtype)
    if ref.transform == "transpose":
        t = t.t()
    return t.to(dtype).contiguous() if t.dtype != dtype or not t.is_contiguous() else t


def read_raw(groups: list[LayerGroup], reader: RangeReader) -> RawTensors:
    """The bytes of every tensor of the groups; a tensor two names share (tied output) is read once."""
    out: RawTensors = {}
    seen: dict[tuple, torch.Tensor] = {}
    for ref in (ref for group in groups for ref in group.tensors):
        key = (ref.info.path, ref.info.offset)
        if key not in seen:
            seen[key] = reader.read(ref.info.path, ref.info.offset, ref.info.nbytes)
        out[ref.name] = (ref, seen[key])
    return out


def read_group(groups: list[LayerGroup], reader: RangeReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the groups decoded to `dtype` (rope tables stay float32): {GGUF name: tensor}."""
    decoded: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, (ref, raw) in read_raw(groups, reader).items():
        key = (ref.info.path, ref.info.offset, ref.transform)
        if key not in decoded:
            decoded[key] = decode_tensor(ref, raw, torch.float32 if name.startswith("rope_freqs") else dtype)
        out[name] = decoded[key]
    return out


class PackedEmbedding(nn.Module):
    """Embedding rows kept in their GGML block format; only the looked-up rows are decoded."""

    def __init__(self, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dim, self.dtype = qtype, shape[1], dtype
        self.register_buffer("rows", raw.view(shape[0], -1))  # (V, row bytes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from ..quant import dequantize

        picked = self.rows[ids.reshape(-1)]  # (n, row bytes)
        values = dequantize(picked, self.qtype, (picked.shape[0], self.dim), out_dtype=self.dtype)
        return values.view(*ids.shape, self.dim)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner_name) if owner_name else root, leaf, module)


def attach_weights(module: nn.Module, raw: RawTensors, prefix: str, dtype: torch.dtype, native: bool,
                   where: str, only: tuple[str, ...] | None = None) -> None:
    """Give `module` its weights from `raw` (GGUF names = prefix + module's own names); `only`
    limits which of the module's tensors are expected (by name prefix).

    Raises UnsupportedModelError for tensors the module does not use, ModelFileError for missing
    tensors or wrong shapes."""
    expected = {name: tuple(p.shape) for name, p in list(module.named_parameters()) + list(module.named_buffers())
                if p is not None and p.is_meta and (only is None or name.startswith(only))}
    given = {name[len(prefix):]: value for name, value in raw.items() if name.startswith(prefix)}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise UnsupportedModelError(f"{where}: tensors {unknown} are not used by this architecture as pipeload "
                                    f"implements it; this model variant is not supported")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ModelFileError(f"{where}: missing tensors {missing}")
    for name, (ref, _) in given.items():
        if ref.shape != expected[name]:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {list(ref.shape)}, "
                                 f"the configuration implies {list(expected[name])}")

    replaced = set()
    if native:
        from ..quant.native import native_linear

        for sub_name, sub in list(module.named_modules()):
            w_name = f"{sub_name}.weight"
            if isinstance(sub, (Linear, Embedding)) and w_name in given:
                ref, data = given[w_name]
                if ref.transform is not None or ref.info.dtype in FLOAT_STORAGE:
                    continue  # float weights take the plain path below
                if isinstance(sub, Linear):
                    new = native_linear(data, ggml_type(ref), ref.shape)
                    if sub.bias is not None:
                        new.register_buffer("bias", decode_tensor(*given[f"{sub_name}.bias"], dtype))
                        replaced.add(f"{sub_name}.bias")
                else:
                    new = PackedEmbedding(data, ggml_type(ref), ref.shape, dtype)
                _set_module(module, sub_name, new)
                replaced.add(w_name)
    for name, (ref, data) in given.items():
        if name in replaced:
            continue
        keep = torch.float32 if name.startswith("rope_freqs") else dtype
        put_tensor(module, name, decode_tensor(ref, data, keep))
