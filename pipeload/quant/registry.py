"""The registry of GGML block quant formats: one small class per type, plus the sizes helpers.

Each format is a subclass of `QuantFormat` that names its `GGMLQuantizationType` when it is
defined; sizes come from gguf-py's `GGML_QUANT_SIZES`. A format turns packed blocks
(uint8 [n_blocks, type_size]) into float32 values ([n_blocks, block_size]) with torch ops only,
and, where it can, float32 blocks back into packed bytes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import gguf
import numpy as np
import torch

from pipeload.errors import ModelFileError, UnsupportedModelError

QK_K = 256  # elements in a K-quant super-block

_FORMATS: dict[int, type[QuantFormat]] = {}


class QuantFormat:
    """One GGML storage type. Subclass with `class X(QuantFormat, qtype=...)` to register it."""

    qtype: ClassVar[gguf.GGMLQuantizationType]
    block_size: ClassVar[int]  # values per block
    type_size: ClassVar[int]  # bytes per block

    def __init_subclass__(cls, qtype: gguf.GGMLQuantizationType | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an abstract helper base, not a format
            return
        cls.qtype = gguf.GGMLQuantizationType(qtype)
        cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[cls.qtype]
        if int(cls.qtype) in _FORMATS:
            raise TypeError(f"quant format {cls.qtype.name} is registered twice")
        _FORMATS[int(cls.qtype)] = cls

    def __init__(self) -> None:
        raise TypeError("quant formats are used through their class methods, not instances")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return float32 [n_blocks, block_size] values of uint8 [n_blocks, type_size] blocks.

        With `out` (contiguous float32 [n_blocks, block_size]) the values are written there.
        """
        raise NotImplementedError

    @classmethod
    def _output(cls, blocks: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Return `out`, or a new float32 [n_blocks, block_size] tensor when it is None."""
        if out is None:
            return torch.empty((blocks.shape[0], cls.block_size), dtype=torch.float32)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """Return uint8 [n_blocks, type_size] packed blocks of float32 [n_blocks, block_size] values.

        Raises UnsupportedModelError for formats pipeload can read but not write.
        """
        raise UnsupportedModelError(f"pipeload cannot quantize to {cls.qtype.name}")


def gguf_quantize_blocks(qtype: gguf.GGMLQuantizationType, blocks: torch.Tensor) -> torch.Tensor:
    """Return uint8 [n_blocks, type_size] blocks packed by gguf-py's numpy quantizer for `qtype`."""
    n_blocks = blocks.shape[0]
    # one long row: gguf-py vectorises over a row but loops in python over groups of 16 rows
    row = blocks.contiguous().view(1, -1).numpy()  # (1, n_blocks * block_size)
    packed = gguf.quants.quantize(row, qtype)  # (1, n_blocks * type_size)
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8)).view(n_blocks, -1)


def format_for(qtype: int | gguf.GGMLQuantizationType) -> type[QuantFormat]:
    """Return the registered format class of `qtype`; raises UnsupportedModelError if none."""
    fmt = _FORMATS.get(int(qtype))
    if fmt is None:
        raise UnsupportedModelError(
            f"GGML quant type {quant_type_name(qtype)} is not supported by pipeload "
            f"(supported: {', '.join(sorted(f.qtype.name for f in _FORMATS.values()))})"
        )
    return fmt


def supported_qtypes() -> list[gguf.GGMLQuantizationType]:
    """Return the quant types pipeload can dequantize, in enum order."""
    return sorted((f.qtype for f in _FORMATS.values()), key=int)


def quant_type_name(qtype: int | gguf.GGMLQuantizationType) -> str:
    """Return the GGML name of `qtype` ("Q4_K"), or "unknown type <n>" for values not in the enum."""
    try:
        return gguf.GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def _block_sizes(qtype: int | gguf.GGMLQuantizationType) -> tuple[gguf.GGMLQuantizationType, int, int]:
    """Return (qtype enum, block_size, type_size); raises UnsupportedModelError for unknown types."""
    try:
        enum = gguf.GGMLQuantizationType(int(qtype))
        block_size, type_size = gguf.GGML_QUANT_SIZES[enum]
    except (ValueError, KeyError):
        name = quant_type_name(qtype)
        raise UnsupportedModelError(f"GGML quant type {name} has no known block size") from None
    return enum, block_size, type_size


def row_nbytes(qtype: int | gguf.GGMLQuantizationType, n_cols: int) -> int:
    """Return the bytes of one row of `n_cols` values; raises ModelFileError if not whole blocks."""
    enum, block_size, type_size = _block_sizes(qtype)
    if n_cols < 0 or n_cols % block_size != 0:
        raise ModelFileError(
            f"row length {n_cols} is not a multiple of the {enum.name} block size {block_size}"
        )
    return n_cols // block_size * type_size


def tensor_nbytes(qtype: int | gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Return the packed bytes of a tensor of torch `shape` (last dim = row); raises ModelFileError."""
    if len(shape) == 0:
        shape = (1,)
    n_rows = math.prod(shape[:-1])
    return n_rows * row_nbytes(qtype, shape[-1])


# ---------------------------------------------------------------------------------------------
# Byte-field helpers shared by the formats


def f16_fields(blocks: torch.Tensor, offset: int, count: int = 1) -> torch.Tensor:
    """Return float32 [n_blocks, count] from `count` little-endian fp16s at byte `offset` of each block."""
    half = blocks[:, offset : offset + 2 * count].contiguous().view(torch.float16)  # (n, count)
    return f16_to_f32(half)


def f16_to_f32(half: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return float32 of an fp16 tensor (into `out` if given), bit-exact with numpy's conversion.

    torch's conversion quiets or canonicalises NaNs while numpy copies their payload bits, so
    NaNs (rare: only in corrupt or random data) are redone with integer ops.
    """
    out = half.to(torch.float32) if out is None else out.copy_(half)
    nan = torch.isnan(out)
    if bool(nan.any()):
        bits = half.view(torch.int16).to(torch.int32)
        exact = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
        out.copy_(torch.where(nan, exact.view(torch.float32), out))
    return out


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Return uint8 [..., n] packing uint8 fields [..., 8 // bits, n] of width `bits` (first = low bits)."""
    packed = fields[..., 0, :].clone()
    for i in range(1, fields.shape[-2]):
        packed |= fields[..., i, :] << (bits * i)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, at: int = 0) -> torch.Tensor:
    """Return uint8 [..., 8 // bits, n] fields of width `bits` from uint8 [..., n] (low bits first).

    Each field is returned shifted left by `at` bits (saves a pass when it becomes high bits).
    """
    packed = packed.contiguous()  # elementwise ops on strided slices of blocks are much slower
    mask = ((1 << bits) - 1) << at
    fields = []
    for shift in range(0, 8, bits):  # one scalar shift per field: much faster than a tensor shift
        if shift > at:
            fields.append((packed >> (shift - at)) & mask)
        elif shift < at:
            fields.append((packed << (at - shift)) & mask)
        else:
            fields.append(packed & mask)
    return torch.stack(fields, dim=-2)
