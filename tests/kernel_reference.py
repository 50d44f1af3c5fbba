"""What the compiled kernels must compute, written independently in torch for the tests:
random valid blocks of each type, llama.cpp's activation quantization (Q8_0, Q8_1, Q8_K), and a
float64 reference of the product with a rounding bound derived from the kernels' arithmetic.

The bound: a kernel's output is a sum of per-block terms (K-quants: (d dx) sumi - (dmin dx) summ
per super-block; legacy blocks: (dw dx) isum [+ mw s]; float rows: one fused multiply-add per
value), each term within 4u of its exact value in relative terms (u = 2^-24, a float32 rounding
per product and conversion), accumulated by sums of at most `n_terms` terms (u each), so
|y - y_exact| <= (n_terms + 6) u sum_i M_i |x_i|, where M_i bounds the magnitude of every part
the kernel splits weight i into (scale * quant and min / offset parts, computed here from
blocks with fields zeroed, all exact in float32) and x_i is the quantized activation.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from pipeload.quant.formats import dequantize

QTYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.F32, T.F16, T.BF16]
# byte offsets of each block's fp16 scale fields: (scale "d" fields, min/"dmin" fields)
SCALE_FIELDS = {T.Q4_0: ([0], []), T.Q4_1: ([0], [2]), T.Q5_0: ([0], []), T.Q5_1: ([0], [2]),
                T.Q8_0: ([0], []), T.Q2_K: ([80], [82]), T.Q3_K: ([108], []), T.Q4_K: ([0], [2]),
                T.Q5_K: ([0], [2]), T.Q6_K: ([208], [])}
ACT_FORMAT = {T.Q4_0: "q8_0", T.Q5_0: "q8_0", T.Q8_0: "q8_0", T.Q4_1: "q8_1", T.Q5_1: "q8_1"}
U = 2.0 ** -24


def act_format(qtype) -> str:
    """The activation format llama.cpp pairs with qtype ("f32" for float weights)."""
    if qtype in (T.F32, T.F16, T.BF16):
        return "f32"
    return ACT_FORMAT.get(qtype, "q8_k")


def random_blocks(qtype, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, row_bytes): random quants, scales of either sign around 1e-3 (finite fp16)."""
    g = np.random.default_rng(seed)
    if qtype in (T.F32, T.F16, T.BF16):
        w = torch.from_numpy(g.standard_normal((n, k), dtype=np.float32) * 0.05)
        dt = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
        return w.to(dt).contiguous().view(torch.uint8).view(n, -1)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = g.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    d_fields, m_fields = SCALE_FIELDS[qtype]
    for off in d_fields + m_fields:
        raw[:, off:off + 2] = (g.standard_normal(raw.shape[0]) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1)).contiguous()


def _with_fields(blocks: torch.Tensor, qtype, zero: list[int]) -> torch.Tensor:
    """Copy of the blocks with the fp16 fields at byte offsets `zero` set to 0."""
    size = GGML_QUANT_SIZES[qtype][1]
    b = blocks.clone().view(-1, size)
    for off in zero:
        b[:, off:off + 2] = 0
    return b.view_as(blocks)


def _deq64(blocks: torch.Tensor, qtype, n: int, k: int) -> torch.Tensor:
    return dequantize(blocks, qtype, (n, k)).double()


def _unit_quants(blocks: torch.Tensor, qtype) -> torch.Tensor:
    """Q3_K / Q6_K blocks whose every quant is offset + 1, so the values are the sub-block scales d * sc."""
    size = GGML_QUANT_SIZES[qtype][1]
    b = blocks.clone().view(-1, size)
    if qtype == T.Q6_K:
        b[:, 0:128] = 0x11        # low nibbles 1
        b[:, 128:192] = 0xAA      # high 2-bit fields 2: q = 1 + 32
    else:  # Q3_K
        b[:, 0:32] = 0xFF         # high bit set: no -4 offset
        b[:, 32:96] = 0x55        # low 2-bit fields 1: q = 5, value 5 - 4
    return b.view_as(blocks)


def weight_parts(blocks: torch.Tensor, qtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, M) float64 (n, k): the weight's exact values and a bound on the magnitude of each part
    the kernels split it into."""
    if qtype in (T.F32, T.F16, T.BF16):
        w = _deq64(blocks, qtype, n, k)
        return w, w.abs()
    d_fields, m_fields = SCALE_FIELDS[qtype]
    if qtype in (T.Q3_K, T.Q6_K):
        off = 32 if qtype == T.Q6_K else 4
        scale = _deq64(_unit_quants(blocks, qtype), qtype, n, k)  # d * sc per value
        w = _deq64(blocks, qtype, n, k)  # (q - off) d sc; Q6_K may round once (in the bound)
        return w, (w + off * scale).abs() + (off * scale).abs()
    if m_fields:  # scale * quant part and min part, each exact
        main = _deq64(_with_fields(blocks, qtype, m_fields), qtype, n, k)
        rest = _deq64(_with_fields(blocks, qtype, d_fields), qtype, n, k)
        return main + rest, main.abs() + rest.abs()
    w = _deq64(blocks, qtype, n, k)
    return w, w.abs()


def _div(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t rounded once, as C divides (torch computes `a / t` as a * reciprocal(t): two roundings)."""
    return torch.full_like(t, a) / t


def quantize_q8_0(x: torch.Tensor, with_sums: bool = False):
    """llama.cpp's Q8_0 (Q8_1 with sums) of float32 x (m, k): (q int8 (m, k), d (m, k/32), s or None)."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)  # (m, nb, 1)
    d = amax / 127
    inv = torch.where(amax != 0, _div(127.0, torch.where(amax != 0, amax, 1)), 0.0)
    q = torch.round(xb * inv)  # half to even
    d16 = d.half().float()
    s = (d * q.sum(-1, keepdim=True)).half().float() if with_sums else None
    return (q.to(torch.int8).view(m, k), d16.view(m, -1), None if s is None else s.view(m, -1))


def quantize_q8_k(x: torch.Tensor):
    """llama.cpp's Q8_K of float32 x (m, k): (q int8 (m, k), d (m, k/256), bsums int16 (m, k/16))."""
    m, k = x.shape
    xb = x.view(m, k // 256, 256)
    idx = xb.abs().argmax(-1, keepdim=True)  # first largest magnitude
    vmax = xb.gather(-1, idx)  # (m, nb, 1)
    zero = vmax == 0
    iscale = _div(-127.0, torch.where(zero, 1.0, vmax))
    q = torch.round(iscale * xb).clamp(max=127)
    q = torch.where(zero, 0.0, q)
    d = torch.where(zero, 0.0, _div(1.0, iscale))
    bsums = q.view(m, k // 16, 16).sum(-1)
    return q.to(torch.int8).view(m, k), d.view(m, -1), bsums.to(torch.int16)


def quantized_activations(x: torch.Tensor, qtype) -> tuple[torch.Tensor, int]:
    """(x as the kernels see it, float64 (m, k); the number of terms summed per output)."""
    m, k = x.shape
    fmt = act_format(qtype)
    if fmt == "f32":
        return x.double(), k // 64 + 8
    if fmt == "q8_k":
        q, d, _ = quantize_q8_k(x)
        return (q.view(m, -1, 256).double() * d.double().unsqueeze(-1)).view(m, k), k // 256
    q, d, _ = quantize_q8_0(x)
    return (q.view(m, -1, 32).double() * d.double().unsqueeze(-1)).view(m, k), k // 32


def reference(x: torch.Tensor, blocks: torch.Tensor, qtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64 (m, n), bound (m, n)): the exact product of the weight and the quantized
    activations, and the rounding bound the kernels' result must be within. For Q4_1/Q5_1 the
    min part meets the activation block sums s as llama.cpp's Q8_1 stores them (d * sum q with
    the unrounded d, rounded to fp16), not the sum of the rounded values."""
    n = blocks.shape[0]
    k = x.shape[1]
    W, M = weight_parts(blocks, qtype, n, k)
    xq, terms = quantized_activations(x.float(), qtype)
    bound = (terms + 6) * U * (xq.abs() @ M.t())
    if act_format(qtype) != "q8_1":
        return xq @ W.t(), bound
    main = _deq64(_with_fields(blocks, qtype, [2]), qtype, n, k)
    mins = (W - main)[:, ::32]  # (n, k/32) the block's m
    _, _, s = quantize_q8_0(x.float(), with_sums=True)
    return xq @ main.t() + s.double() @ mins.t(), bound
