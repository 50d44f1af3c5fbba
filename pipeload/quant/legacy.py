"""The 32-value block formats: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Dequantization repeats gguf-py's float32 operations (q * d, then + m), so the results are the
same bits: integer offsets are applied before the conversion to float, where they are exact.
Quantization is delegated to gguf-py, whose quantizers are bit-exact with llama.cpp.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from pipeload.quant.registry import QuantFormat, f16_fields, gguf_quantize_blocks


def _put_nibbles(out: torch.Tensor, qs: torch.Tensor, offset: int = 0) -> None:
    """Write uint8 qs [n, 16]'s low nibbles (minus offset) to out[:, :16], high nibbles to out[:, 16:]."""
    qs = qs.contiguous()  # elementwise ops on a strided slice of the blocks are several times slower
    halves = out.view(-1, 2, 16)  # (n, 2, 16)
    if offset:
        halves[:, 0].copy_((qs & 0x0F).view(torch.int8) - offset)
        halves[:, 1].copy_((qs >> 4).view(torch.int8) - offset)
    else:
        halves[:, 0].copy_(qs & 0x0F)
        halves[:, 1].copy_(qs >> 4)


# Spreading the 8 bits of a byte over 8 byte lanes of an int64: the multiply copies the byte into
# every lane, the mask keeps bit k in lane k, adding 0x7F sets bit 7 of the nonzero lanes (no lane
# carries over), and the shift and last mask leave 16 in lane k when bit k was set.
_BYTE_LANES = 0x0101010101010101
_BIT_PER_LANE = 0x8040201008040201 - (1 << 64)  # as a signed int64
_LANE_ROUND_UP = 0x7F7F7F7F7F7F7F7F
_LANE_BIT4 = 0x1010101010101010


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Return uint8 [n, 32] 5-bit quants from qh (uint32 high bits as uint8 [n, 4]) and qs [n, 16]."""
    n = qs.shape[0]
    lanes = (qh.to(torch.int64) * _BYTE_LANES) & _BIT_PER_LANE  # (n, 4): lane k is 0 or 2^k
    high = ((lanes + _LANE_ROUND_UP) >> 3) & _LANE_BIT4  # (n, 4): lane k is 0 or 16
    qs = qs.contiguous()
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # (n, 32)
    return low | high.view(torch.uint8).view(n, 32)  # quant i takes bit i of qh as 16


class _Legacy(QuantFormat):
    """Base of the legacy formats: quantization is delegated to gguf-py."""

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return gguf_quantize_blocks(cls.qtype, blocks)


class Q8_0(_Legacy, qtype=T.Q8_0):
    """d (fp16), 32 x int8 q; value = q * d."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 32)
        d = f16_fields(blocks, 0)  # (n, 1)
        out.copy_(blocks[:, 2:].view(torch.int8))
        return out.mul_(d)


class Q4_0(_Legacy, qtype=T.Q4_0):
    """d (fp16), 16 bytes of 4-bit quants q; value = d * (q - 8)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 32)
        d = f16_fields(blocks, 0)  # (n, 1)
        _put_nibbles(out, blocks[:, 2:18], offset=8)
        return out.mul_(d)


class Q4_1(_Legacy, qtype=T.Q4_1):
    """d, m (fp16), 16 bytes of 4-bit quants q; value = d * q + m."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 32)
        dm = f16_fields(blocks, 0, 2)  # (n, 2)
        _put_nibbles(out, blocks[:, 4:20])
        return out.mul_(dm[:, 0:1]).add_(dm[:, 1:2])


class Q5_0(_Legacy, qtype=T.Q5_0):
    """d (fp16), 32 high bits, 16 bytes of low nibbles; value = d * (q - 16)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 32)
        d = f16_fields(blocks, 0)  # (n, 1)
        out.copy_(_five_bits(blocks[:, 2:6], blocks[:, 6:22]).view(torch.int8) - 16)
        return out.mul_(d)


class Q5_1(_Legacy, qtype=T.Q5_1):
    """d, m (fp16), 32 high bits, 16 bytes of low nibbles; value = d * q + m."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = cls._output(blocks, out)  # (n, 32)
        dm = f16_fields(blocks, 0, 2)  # (n, 2)
        out.copy_(_five_bits(blocks[:, 4:8], blocks[:, 8:24]))
        return out.mul_(dm[:, 0:1]).add_(dm[:, 1:2])
