"""The K-quant super-block formats (256 values per block): Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.

Dequantization repeats gguf-py's float32 operations in the same order (scale products first,
then `dl * q - ml` as two separate ops), so the results are the same bits. Quantization follows
the ideas of llama.cpp's reference quantizers (see `pipeload.quant.search`), vectorised over
blocks; it is not bit-identical with llama.cpp but packs the same layout.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from pipeload.quant import search
from pipeload.quant.registry import QK_K, QuantFormat, f16_fields, pack_bits, unpack_bits


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Return uint8 [n, 2] little-endian fp16 bytes of float32 [n] or [n, 1]."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _f16_round(x: torch.Tensor) -> torch.Tensor:
    """Return float32 `x` rounded through fp16, as the dequantizer will see it."""
    return x.to(torch.float16).to(torch.float32)


def _pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """Return uint8 [n, 64] with 2-bit q [n, 256] packed as Q2_K/Q3_K do (4 per byte, 32 apart)."""
    return pack_bits(q.view(-1, 2, 4, 32), 2).view(-1, QK_K // 4)  # (n, 2, 32) -> (n, 64)


# ---------------------------------------------------------------------------------------------
# 6-bit packed scales and mins of Q4_K / Q5_K (12 bytes for 8 scales and 8 mins)


def _unpack_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return uint8 (sc [n, 8], mn [n, 8]) from the 12 packed scale bytes uint8 [n, 12].

    Bytes 0-3 hold sc 0-3 (low 6 bits) and the top bits of sc 4-7; bytes 4-7 the same for mn;
    bytes 8-11 the low nibbles of sc 4-7 (low) and mn 4-7 (high). Done on int32 words, four
    bytes at a time.
    """
    n = scales.shape[0]
    w = scales.contiguous().view(torch.int32)  # (n, 3) little-endian words
    w_d, w_m, w_md = w[:, 0:1], w[:, 1:2], w[:, 2:3]  # (n, 1) each
    unpacked = torch.cat(
        [
            w_d & 0x3F3F3F3F,
            (w_md & 0x0F0F0F0F) | ((w_d >> 2) & 0x30303030),
            w_m & 0x3F3F3F3F,
            ((w_md >> 4) & 0x0F0F0F0F) | ((w_m >> 2) & 0x30303030),
        ],
        dim=1,
    ).view(torch.uint8)  # (n, 16): sc 0-7 then mn 0-7
    return unpacked[:, :8], unpacked[:, 8:]


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Return uint8 [n, 12] packing 6-bit sc [n, 8] and mn [n, 8]."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)  # (n, 4)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)  # (n, 4)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)  # (n, 4)
    return torch.cat([lo, mid, hi], dim=1)


def _nearest_levels(x: torch.Tensor, d_sub: torch.Tensor, lo: int, hi: int, m_sub=None) -> torch.Tensor:
    """Return uint8 [n, s, k]: round((x + m_sub) / d_sub) clamped to [lo, hi], minus lo.

    x is [n, s, k], d_sub and m_sub [n, s, 1] the stored (fp16-rounded) sub-block scale and min.
    Sub-blocks with scale 0 get the level of value 0, -lo.
    """
    zero = d_sub == 0  # (n, s, 1)
    shifted = x if m_sub is None else x + m_sub
    levels = torch.round(shifted / torch.where(zero, 1.0, d_sub)).clamp_(lo, hi)  # (n, s, k)
    return torch.where(zero, 0.0, levels).sub_(lo).to(torch.uint8)


def _quantize_scale_min(
    blocks: torch.Tensor,
    sub: int,
    nmax: int,
    scale_max: int,
    weights: torch.Tensor,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
):
    """Return (d [n, 1], dmin [n, 1], sc [n, s], mn [n, s], L [n, 256]) for Q2_K/Q4_K/Q5_K.

    Fits each `sub`-value sub-block as scale * L - min with `search.scale_min_fit` (llama.cpp's
    make_qkx2_quants), stores scales and mins as integers up to `scale_max` times the block's
    fp16 d and dmin, then requantizes every value against the stored (rounded) scales.
    """
    n, s = blocks.shape[0], QK_K // sub
    x = blocks.view(n * s, sub)  # (n*s, sub) sub-blocks
    scale, the_min = search.scale_min_fit(x, weights.view(n * s, sub), nmax, rmin, rdelta, nstep, use_mad)
    scale, the_min = scale.view(n, s), the_min.view(n, s)  # (n, s) each, both >= 0

    max_scale = scale.amax(dim=1, keepdim=True)  # (n, 1)
    max_min = the_min.amax(dim=1, keepdim=True)  # (n, 1)
    inv_scale = torch.where(max_scale > 0, scale_max / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, scale_max / max_min, 0.0)
    sc = torch.round(inv_scale * scale).clamp_(0, scale_max).to(torch.uint8)  # (n, s)
    mn = torch.round(inv_min * the_min).clamp_(0, scale_max).to(torch.uint8)  # (n, s)
    d = _f16_round(max_scale / scale_max)  # (n, 1)
    dmin = _f16_round(max_min / scale_max)  # (n, 1)

    d_sub = (d * sc.to(torch.float32)).view(n, s, 1)  # (n, s, 1)
    m_sub = (dmin * mn.to(torch.float32)).view(n, s, 1)  # (n, s, 1)
    L = _nearest_levels(blocks.view(n, s, sub), d_sub, 0, nmax, m_sub).view(n, QK_K)  # (n, 256)
    return d, dmin, sc, mn, L


def _quantize_q45(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Return `_quantize_scale_min`'s results as quantize_row_q4_K_ref / q5_K_ref choose them."""
    x = blocks.view(-1, 8, 32)  # (n, 8, 32)
    av_x = x.square().mean(dim=2, keepdim=True).sqrt_()  # (n, 8, 1) RMS of the sub-block
    weights = (av_x + x.abs()).view(-1, QK_K)  # (n, 256)
    return _quantize_scale_min(blocks, 32, nmax, 63, weights, rmin, 0.1, nstep, use_mad=False)


def _fit_sub_blocks_signed(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> torch.Tensor:
    """Return the signed scale [n, 16] of each 16-value sub-block of x [n, 256] (make_qx_quants)."""
    n = x.shape[0]
    scale, _ = search.symmetric_fit(x.view(n * 16, 16), weights.view(n * 16, 16), nmax)
    return scale.view(n, 16)


# ---------------------------------------------------------------------------------------------
# The formats


class Q2_K(QuantFormat, qtype=T.Q2_K):
    """scales (16 x 4-bit scale | 4-bit min), qs (256 x 2 bits), d, dmin (fp16)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        out = cls._output(blocks, out)  # (n, 256)
        scales = blocks[:, :16]  # (n, 16)
        dd = f16_fields(blocks, 80, 2)  # (n, 2) d, dmin
        dl = (dd[:, 0:1] * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)  # (n, 16, 1)
        ml = (dd[:, 1:2] * (scales >> 4).to(torch.float32)).view(n, 16, 1)  # (n, 16, 1)
        out.view(n, 2, 4, 32).copy_(unpack_bits(blocks[:, 16:80].view(n, 2, 32), 2))  # (n, 2, 4, 32)
        out.view(n, 16, 16).mul_(dl).sub_(ml)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        # llama.cpp's quantize_row_q2_K_ref: weights |x|, absolute error, 4-bit scales and mins
        d, dmin, sc, mn, L = _quantize_scale_min(blocks, 16, 3, 15, blocks.abs(), -0.5, 0.1, 15, use_mad=True)
        return torch.cat([sc | (mn << 4), _pack_crumbs(L), _f16_bytes(d), _f16_bytes(dmin)], dim=1)

class Q3_K(QuantFormat, qtype=T.Q3_K):
    """hmask (256 high bits), qs (256 x 2 low bits), 16 x 6-bit signed scales, d (fp16)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        out = cls._output(blocks, out)  # (n, 256)
        d = f16_fields(blocks, 108)  # (n, 1)
        lscales = unpack_bits(blocks[:, 96:104], 4).view(n, 16)  # (n, 16) low 4 bits
        hscales = unpack_bits(blocks[:, 104:108], 2, at=4).view(n, 16)  # (n, 16) high 2 bits
        scales = (lscales | hscales).view(torch.int8) - 32  # (n, 16)
        dl = (d * scales.to(torch.float32)).view(n, 16, 1)  # (n, 16, 1)
        ql = unpack_bits(blocks[:, 32:96].view(n, 2, 32), 2).view(n, 8, 32)  # (n, 8, 32) low 2 bits
        qh = unpack_bits(blocks[:, 0:32], 1, at=2)  # (n, 8, 32) 4 = high bit set = no -4 offset
        out.view(n, 8, 32).copy_((ql | qh).view(torch.int8) - 4)
        out.view(n, 16, 16).mul_(dl)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        # llama.cpp's quantize_row_q3_K_impl with weights x^2: fit each 16-value sub-block, then
        # fit the 16 sub-block scales themselves as 6-bit signed multiples of one fp16 d.
        n = blocks.shape[0]
        weights = blocks.square()  # (n, 256)
        scale = _fit_sub_blocks_signed(blocks, weights, 4)  # (n, 16)
        sw = weights.view(n, 16, 16).sum(dim=2)  # (n, 16)
        d_block, ls = search.symmetric_fit(scale, sw, 32)  # (n,), (n, 16) in [0, 64)
        d = _f16_round(d_block).view(n, 1)  # (n, 1)
        d_sub = (d * (ls - 32)).view(n, 16, 1)  # (n, 16, 1)
        L = _nearest_levels(blocks.view(n, 16, 16), d_sub, -4, 3).view(n, QK_K)  # (n, 256) in [0, 8)

        hmask = pack_bits((L >> 2).view(n, 8, 32), 1)  # (n, 32) bit g = high bit of value 32g + i
        qs = _pack_crumbs(L & 3)  # (n, 64)
        ls = ls.to(torch.uint8)  # (n, 16)
        lo = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)  # (n, 8)
        hi = pack_bits((ls >> 4).view(n, 4, 4), 2)  # (n, 4): byte j % 4 has bits 2*(j // 4) of scale j
        return torch.cat([hmask, qs, lo, hi, _f16_bytes(d)], dim=1)


class Q4_K(QuantFormat, qtype=T.Q4_K):
    """d, dmin (fp16), 8 x (6-bit scale, 6-bit min) in 12 bytes, qs (256 x 4 bits)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        out = cls._output(blocks, out)  # (n, 256)
        dd = f16_fields(blocks, 0, 2)  # (n, 2) d, dmin
        sc, mn = _unpack_scale_min(blocks[:, 4:16])  # (n, 8) each
        dl = (dd[:, 0:1] * sc.to(torch.float32)).view(n, 8, 1)  # (n, 8, 1)
        ml = (dd[:, 1:2] * mn.to(torch.float32)).view(n, 8, 1)  # (n, 8, 1)
        qs = blocks[:, 16:144].contiguous().view(n, 4, 32)  # (n, 4, 32)
        q = out.view(n, 4, 2, 32)
        q[:, :, 0].copy_(qs & 0x0F)
        q[:, :, 1].copy_(qs >> 4)
        out.view(n, 8, 32).mul_(dl).sub_(ml)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin, sc, mn, L = _quantize_q45(blocks, nmax=15, rmin=-1.0, nstep=20)
        q = L.view(n, 4, 2, 32)  # (n, 4, 2, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)  # (n, 128)
        return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, mn), qs], dim=1)


class Q5_K(QuantFormat, qtype=T.Q5_K):
    """d, dmin (fp16), 12 bytes of scales/mins, qh (256 high bits), qs (256 x 4 low bits)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        out = cls._output(blocks, out)  # (n, 256)
        dd = f16_fields(blocks, 0, 2)  # (n, 2) d, dmin
        sc, mn = _unpack_scale_min(blocks[:, 4:16])  # (n, 8) each
        dl = (dd[:, 0:1] * sc.to(torch.float32)).view(n, 8, 1)  # (n, 8, 1)
        ml = (dd[:, 1:2] * mn.to(torch.float32)).view(n, 8, 1)  # (n, 8, 1)
        qh = unpack_bits(blocks[:, 16:48], 1, at=4)  # (n, 8, 32) 0 or 16
        ql = unpack_bits(blocks[:, 48:176].view(n, 4, 32), 4).view(n, 8, 32)  # (n, 8, 32)
        out.view(n, 8, 32).copy_(ql | qh)
        out.view(n, 8, 32).mul_(dl).sub_(ml)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin, sc, mn, L = _quantize_q45(blocks, nmax=31, rmin=-0.5, nstep=15)
        q = L.view(n, 8, 32)  # (n, 8, 32) sub-block s holds its high bits in bit s of qh
        qh = pack_bits(q >> 4, 1)  # (n, 32)
        low = (q & 0x0F).view(n, 4, 2, 32)  # (n, 4, 2, 32)
        qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)  # (n, 128)
        return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, mn), qh, qs], dim=1)


class Q6_K(QuantFormat, qtype=T.Q6_K):
    """ql (256 x 4 low bits), qh (256 x 2 high bits), 16 x int8 scales, d (fp16)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = blocks.shape[0]
        out = cls._output(blocks, out)  # (n, 256)
        scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)  # (n, 16)
        d = f16_fields(blocks, 208)  # (n, 1)
        dl = (d * scales).view(n, 16, 1)  # (n, 16, 1)
        ql = unpack_bits(blocks[:, 0:128].view(n, 2, 64), 4).view(n, 8, 32)  # (n, 8, 32)
        qh = unpack_bits(blocks[:, 128:192].view(n, 2, 32), 2, at=4).view(n, 8, 32)  # (n, 8, 32)
        out.view(n, 8, 32).copy_((ql | qh).view(torch.int8) - 32)
        out.view(n, 16, 16).mul_(dl)
        return out

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        # llama.cpp's quantize_row_q6_K_ref: fit each 16-value sub-block (weights x^2), then store
        # the sub-block scales as int8 multiples of one fp16 d set by the largest |scale|.
        n = blocks.shape[0]
        scale = _fit_sub_blocks_signed(blocks, blocks.square(), 32)  # (n, 16)
        idx = scale.abs().argmax(dim=1, keepdim=True)  # (n, 1) first largest |scale|
        max_scale = scale.gather(1, idx)  # (n, 1) signed
        zero = max_scale.abs() < search.GROUP_MAX_EPS  # (n, 1) all-zero block
        iscale = torch.where(zero, 0.0, -128.0 / torch.where(zero, 1.0, max_scale))  # (n, 1)
        d = _f16_round(torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale)))  # (n, 1)
        sc = torch.round(iscale * scale).clamp_(-128, 127)  # (n, 16)
        d_sub = (d * sc).view(n, 16, 1)  # (n, 16, 1)
        L = _nearest_levels(blocks.view(n, 16, 16), d_sub, -32, 31)  # (n, 16, 16) in [0, 64)
        L = L.view(n, 2, 4, 32)  # (n, half, quarter, 32)

        low = L & 0x0F
        ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
        qh = pack_bits(L >> 4, 2)  # (n, 2, 32); ql is (n, 2, 64)
        sc8 = sc.to(torch.int8).view(torch.uint8)  # (n, 16)
        return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc8, _f16_bytes(d)], dim=1)
