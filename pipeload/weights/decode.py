"""Stored tensor bytes -> float tensors, for the code that wants values, not bytes (convert,
quantize, the float32 reference mode, norms and biases). Compute never goes through here: it
runs on the stored bytes (quant/ops.py)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ..errors import UnsupportedModelError
from .index import LayerGroup, TensorRef
from .io import RangeReader

PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def ggml_type(ref: TensorRef) -> GGMLQuantizationType:
    """The GGML type a tensor is stored in; raises UnsupportedModelError for other storage."""
    name = ref.info.dtype
    if name not in GGMLQuantizationType.__members__:
        raise UnsupportedModelError(f"tensor {ref.name!r} has type {name!r}, which pipeload does not compute on")
    return GGMLQuantizationType[name]


def decode_tensor(ref: TensorRef, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values held by `raw` (the tensor's bytes) as `dtype`, in torch shape, transform applied.
    May be a view of `raw` when no conversion is needed."""
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


def read_decoded(groups: list[LayerGroup], reader: RangeReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the groups read and decoded to `dtype` (rope tables stay float32):
    {GGUF name: tensor}. A tensor two names share (a tied output) is read once."""
    decoded: dict[tuple, torch.Tensor] = {}
    out = {}
    for ref in (ref for group in groups for ref in group.tensors):
        key = (ref.info.path, ref.info.offset, ref.transform)
        if key not in decoded:
            raw = reader.read(ref.info.path, ref.info.offset, ref.info.nbytes)
            decoded[key] = decode_tensor(ref, raw, torch.float32 if ref.name.startswith("rope_") else dtype)
        out[ref.name] = decoded[key]
    return out
