"""Unquantized storage types: F32, F16 and BF16 (one value per "block")."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from pipeload.quant.registry import QuantFormat, f16_to_f32


def _aligned(blocks: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Return `blocks` (or a copy of it) contiguous and aligned so it can be viewed as `itemsize` words."""
    if blocks.is_contiguous() and blocks.storage_offset() % itemsize == 0:
        return blocks
    return blocks.clone(memory_format=torch.contiguous_format)


class F32(QuantFormat, qtype=T.F32):
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        values = _aligned(blocks, 4).view(torch.float32)  # (n, 1)
        return values.clone() if out is None else out.copy_(values)

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(torch.float32).contiguous().view(torch.uint8)  # (n, 4)


class F16(QuantFormat, qtype=T.F16):
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return f16_to_f32(_aligned(blocks, 2).view(torch.float16), out=out)  # (n, 1)

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(torch.float16).contiguous().view(torch.uint8)  # (n, 2)


class BF16(QuantFormat, qtype=T.BF16):
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 1)
        bits = out.view(torch.int32).copy_(_aligned(blocks, 2).view(torch.int16))  # sign-extended
        bits <<= 16
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        # round to nearest even, NaNs forced quiet: the same integer recipe as ggml_compute_fp32_to_bf16
        n = blocks.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (n, 1)
        is_nan = (n & 0x7FFFFFFF) > 0x7F800000
        n = torch.where(is_nan, (n & 0xFFFF0000) | (64 << 16), n)
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        return n.to(torch.int16).view(torch.uint8)  # (n, 2); int64 -> int16 keeps the low 16 bits
