"""GGML tensors -> kernel-native packed weights (see quant/linear.py), done once per tensor.

- Q4_0, Q4_1 and Q4_K map onto 4-bit groups of 32 with (scale, zero): Q4_K's 32-value
  sub-blocks have their own scale d*sc and min dmin*m, so w = d*sc*q - dmin*m becomes
  (q - 8)*scale + zero with scale = d*sc, zero = 8*scale - dmin*m. The integers are kept exactly;
  the only change is that scale and zero are stored in bf16, as the kernel requires.
- Q5_*, Q6_K, Q8_0 (and Q2_K/Q3_K) have no 5- or 6-bit kernel: they are dequantized exactly and
  requantized to 8 bits with one scale per row. `requantization_error` measures what that costs.
- F32/F16/BF16 stay float (bf16) and use F.linear.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from .formats import dequantize
from .kquants import _unpack_scale_min
from .linear import Int4Linear, Int8Linear, Linear, pack_int4
from .registry import f16_fields

INT4_TYPES = {T.Q4_0, T.Q4_1, T.Q4_K}
FLOAT_TYPES = {T.F32, T.F16, T.BF16}
GROUP = 32


def int4_groups(raw: torch.Tensor, qtype: T, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K] in 0..15, scale float32 [N, K/32], zero float32 [N, K/32]) of a 4-bit GGML
    tensor, such that weight = (q - 8) * scale + zero."""
    if qtype == T.Q4_K:
        blocks = raw.view(-1, 144)  # (n_blocks, 144)
        nb = blocks.shape[0]
        dd = f16_fields(blocks, 0, 2)  # (nb, 2)
        sc, mn = _unpack_scale_min(blocks[:, 4:16])  # (nb, 8)
        scale = dd[:, 0:1] * sc.to(torch.float32)  # (nb, 8)
        zero = 8 * scale - dd[:, 1:2] * mn.to(torch.float32)
        qs = blocks[:, 16:144].reshape(nb, 4, 1, 32)  # sub-blocks 2i (low nibbles), 2i+1 (high)
        q = torch.cat((qs & 15, qs >> 4), dim=2)  # (nb, 4, 2, 32)
    elif qtype in (T.Q4_0, T.Q4_1):
        size = 18 if qtype == T.Q4_0 else 20
        blocks = raw.view(-1, size)
        nb = blocks.shape[0]
        d = f16_fields(blocks, 0)  # (nb, 1)
        qs = blocks[:, size - 16:].reshape(nb, 1, 16)
        q = torch.cat((qs & 15, qs >> 4), dim=1)  # (nb, 2, 16): values 0..15, 16..31
        scale = d
        zero = torch.zeros_like(d) if qtype == T.Q4_0 else f16_fields(blocks, 2) + 8 * d  # Q4_1: d*q + m
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit format")
    return q.reshape(n, k), scale.reshape(n, k // GROUP), zero.reshape(n, k // GROUP)


def to_int4_linear(raw: torch.Tensor, qtype: T, n: int, k: int) -> Int4Linear:
    q, scale, zero = int4_groups(raw, qtype, n, k)
    m = Int4Linear(k, n, GROUP)
    m.qweight = pack_int4(q)
    m.scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # (K/G, N, 2)
    return m


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], scale bf16 [N]) with one symmetric scale per row (round to nearest)."""
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # the kernel sees bf16 scales
    safe = torch.where(scale == 0, 1.0, scale)
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def to_int8_linear(w: torch.Tensor) -> Int8Linear:
    n, k = w.shape
    m = Int8Linear(k, n)
    m.qweight, m.scales = int8_rows(w.float())
    return m


CONVERT_ROWS = 1024  # rows dequantized at a time when requantizing: bounds the memory of conversion


def native_linear(raw: torch.Tensor, qtype: T, shape: tuple[int, int]) -> nn.Module:
    """The kernel-native linear module (without bias) for a GGML weight of torch shape (N, K)."""
    n, k = shape
    if qtype in INT4_TYPES and Int4Linear.can_hold(n, k, GROUP):
        return to_int4_linear(raw, qtype, n, k)
    if qtype in FLOAT_TYPES:
        m = Linear(k, n)
        m.weight = nn.Parameter(dequantize(raw, qtype, shape, out_dtype=torch.bfloat16), requires_grad=False)
        return m
    m = Int8Linear(k, n)
    m.qweight, m.scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.bfloat16)
    row_bytes = raw.numel() // n
    for r in range(0, n, CONVERT_ROWS):  # GGML rows are independent: convert a slice at a time
        r1 = min(n, r + CONVERT_ROWS)
        w = dequantize(raw.view(-1)[r * row_bytes:r1 * row_bytes], qtype, (r1 - r, k))
        m.qweight[r:r1], m.scales[r:r1] = int8_rows(w)
    return m


def requantization_error(raw: torch.Tensor, qtype: T, shape: tuple[int, int]) -> float:
    """RMS of (kernel-native weight - exact GGML weight) relative to the RMS of the weight."""
    exact = dequantize(raw, qtype, shape)
    m = native_linear(raw, qtype, shape)
    got = m.dequantized().float() if hasattr(m, "dequantized") else m.weight.float()  # whole weight
    return float((got - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())


def native_nbytes(qtype: T, shape: tuple[int, ...], dtype: torch.dtype, is_matrix: bool) -> int:
    """Bytes a tensor occupies once loaded: packed kernel formats for quantized matrices in the
    bf16 path (the rules of native_linear), else `dtype` elements."""
    numel = 1
    for d in shape:
        numel *= d
    if dtype != torch.bfloat16 or not is_matrix or len(shape) != 2 or qtype in FLOAT_TYPES:
        return numel * torch.empty(0, dtype=dtype).element_size()
    n, k = shape
    if qtype in INT4_TYPES and Int4Linear.can_hold(n, k, GROUP):
        return n * k // 2 + (k // GROUP) * n * 2 * 2  # packed nibbles + bf16 (scale, zero) per group
    return n * k + n * 2  # int8 + one bf16 scale per row
