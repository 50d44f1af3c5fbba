"""Turning indexed byte ranges into module weights.

Modules are built on the meta device; `assign_weights` attaches the decoded tensors, so a weight
exists exactly once. Every tensor the module expects must be in the group, and every tensor in
the group must be used: a missing or unknown tensor is a clear error, never a silent skip.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelFileError, UnsupportedModelError
from ..weights.index import LayerGroup, TensorRef
from ..weights.io import RangeReader

PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def decode_tensor(ref: TensorRef, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight held by `raw` (the tensor's bytes) as `dtype`, in torch shape, transform applied."""
    info = ref.info
    plain = PLAIN_DTYPES.get(info.dtype)
    if plain is not None:
        t = raw.view(plain).view(info.shape)
    else:
        from gguf import GGMLQuantizationType

        from ..quant import dequantize

        if info.dtype not in GGMLQuantizationType.__members__:
            raise UnsupportedModelError(f"tensor {ref.name!r} has unknown type {info.dtype!r}")
        t = dequantize(raw, GGMLQuantizationType[info.dtype], info.shape, out_dtype=dtype)
    if ref.transform == "transpose":
        t = t.t()
    return t.to(dtype).contiguous() if t.dtype != dtype or not t.is_contiguous() else t


def read_group(groups: list[LayerGroup], reader: RangeReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read and decode every tensor of the layer groups: {GGUF name: tensor}. A tensor that two
    names share (a tied output matrix) is read and decoded once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    for ref in (ref for group in groups for ref in group.tensors):
        key = (ref.info.path, ref.info.offset, ref.transform)
        if key not in seen:
            raw = reader.read(ref.info.path, ref.info.offset, ref.info.nbytes)
            keep = torch.float32 if ref.name.startswith("rope_freqs") else dtype
            seen[key] = decode_tensor(ref, raw, keep)
        out[ref.name] = seen[key]
    return out


def assign_weights(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Attach `tensors` (names relative to `module`) as its parameters, checking names and shapes."""
    expected = dict(module.named_parameters())
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UnsupportedModelError(
            f"{where}: tensors {unknown} are not used by this architecture as pipeload implements it; "
            f"this model variant is not supported")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelFileError(f"{where}: missing tensors {missing}")
    for name, t in tensors.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the configuration implies {list(want)}")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items()}
