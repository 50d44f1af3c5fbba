"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, feeding each column's
rounding error forward into the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs, so that the layer's *outputs* on calibration data change as little as possible.

For a linear layer y = W x with calibration inputs X (n, K), the output error of a quantized W'
is ||(W - W') X^T||^2 = tr((W - W') H (W - W')^T) with H = X^T X. GPTQ walks the columns in
order; after rounding column i it adds -(w_i - q_i) / [H^-1]_ii * [H^-1]_i,j to every later column
j (with the upper Cholesky factor of H^-1), in lazy batches of columns (one matrix product per
batch instead of a rank-1 update per column).

The result is stored in GGML block formats that llama.cpp and pipeload compute on as stored:
- Q4_K: per 256 columns a super-block; its 8 sub-blocks of 32 get a 6-bit scale and min. When
  the walk reaches a super-block, the grid (d, dmin, scales, mins) is fitted to the current
  (error-updated) weights with the same search as the round-to-nearest quantizer, optionally
  weighted by the Hessian diagonal (llama.cpp's importance-matrix idea); then each column is
  rounded onto that grid.
- Q4_0: per 32 columns one fp16 scale, value = d * (q - 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kquants import _f16_bytes, _pack_scale_min, _quantize_scale_min
from .registry import QK_K

GPTQ_TYPES = ("Q4_K", "Q4_0")
SPAN = {"Q4_K": QK_K, "Q4_0": 32}  # columns whose grid is fitted together


@dataclass
class GPTQResult:
    values: torch.Tensor   # float32 (N, K): the quantized weight, as the dequantizer will see it
    packed: np.ndarray     # uint8 (N, row bytes): GGML blocks
    error: float           # relative output error tr(dW H dW^T) / tr(W H W^T) on the calibration data


class HessianAccumulator:
    """Running H = (1/n) sum x x^T over the rows x of a linear layer's inputs."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (m, K)
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m)).addmm_(x.t(), x, alpha=1.0 / (self.n + m))
        self.n += m


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): relative squared error of the layer's outputs."""
    d = (W - Q).double()
    Hd = H.double()
    num = ((d @ Hd) * d).sum()
    den = ((W.double() @ Hd) * W.double()).sum()
    return float(num / den) if den > 0 else float(num)


# ---------------------------------------------------------------------------------------------
# Grids: for a slab of columns, per-column (scale s, min m) such that value = s * L - m, L in 0..15


def _fit_q4_k(x: torch.Tensor, importance: torch.Tensor | None):
    """Grid of a (N, 256) slab: ((s, m) each (N, 256), fields for packing)."""
    n = x.shape[0]
    sub = x.view(n, 8, 32)
    weights = sub.square().mean(dim=2, keepdim=True).sqrt_() + sub.abs()  # (N, 8, 32) as the RTN quantizer
    if importance is not None:  # importance-weighted fit (llama.cpp's imatrix form)
        sigma2 = 2 * x.square().mean(dim=1, keepdim=True)  # (N, 1)
        weights = (importance.view(1, 256) * (sigma2 + x.square()).sqrt()).view(n, 8, 32)
    d, dmin, sc, mn, _ = _quantize_scale_min(x.contiguous(), 32, 15, 63, weights.reshape(n, 256).contiguous(),
                                             -1.0, 0.1, 20, use_mad=False)
    s = (d * sc.float()).repeat_interleave(32, dim=1)     # (N, 256)
    m = (dmin * mn.float()).repeat_interleave(32, dim=1)  # (N, 256)
    return s, m, (d, dmin, sc, mn)


def _pack_q4_k(fields, L: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 144) Q4_K blocks of one slab from its fields and codes L (N, 256)."""
    d, dmin, sc, mn = fields
    n = L.shape[0]
    q = L.view(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(sc, mn), qs], dim=1)


def _fit_q4_0(x: torch.Tensor, importance: torch.Tensor | None):
    """Grid of a (N, 32) slab: d = (signed value of largest magnitude) / -8, rounded to fp16."""
    idx = x.abs().argmax(dim=1, keepdim=True)
    d = (x.gather(1, idx) / -8).to(torch.float16).float()  # (N, 1)
    s = d.expand(-1, 32)
    return s, 8 * s, (d,)


def _pack_q4_0(fields, L: torch.Tensor) -> torch.Tensor:
    (d,) = fields
    qs = L[:, :16] | (L[:, 16:] << 4)  # (N, 16)
    return torch.cat([_f16_bytes(d), qs], dim=1)


_GRIDS = {"Q4_K": (_fit_q4_k, _pack_q4_k), "Q4_0": (_fit_q4_0, _pack_q4_0)}


def _round_onto(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Codes L in 0..15 nearest to w on the grid s * L - m (L = 0 where s == 0)."""
    zero = s == 0
    return torch.where(zero, 0.0, torch.round((w + m) / torch.where(zero, 1.0, s)).clamp_(0, 15))


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the damping until it
    factorizes. Columns the calibration never activated (zero diagonal) get a unit diagonal."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = float(torch.diag(H).mean())
    for attempt in range(8):
        Hd = H + (damp * 10 ** attempt) * mean_diag * torch.eye(H.shape[0])
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("the calibration Hessian is not positive definite even with strong damping")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, qtype: str, damp: float = 0.01, block: int = 256,
                  importance: bool = True, act_order: bool = False, Hinv: torch.Tensor | None = None) -> GPTQResult:
    """Quantize W (N, K) to `qtype` ("Q4_K" or "Q4_0") with GPTQ, given H = E[x x^T] (K, K) of its
    inputs; `Hinv` may pass a precomputed `inverse_hessian_factor(H, damp)` (layers sharing inputs).

    importance: fit each slab's grid weighting columns by diag(H). act_order: quantize columns in
    order of decreasing diag(H) (the most active inputs first, while there is most freedom left to
    compensate), with every slab's grid fitted up front to the original weights ("static groups").
    Raises ValueError for another type or K not a multiple of the type's block."""
    if qtype not in _GRIDS:
        raise ValueError(f"GPTQ writes {', '.join(GPTQ_TYPES)}, not {qtype}")
    fit, pack = _GRIDS[qtype]
    span = SPAN[qtype]
    N, K = W.shape
    if K % span:
        raise ValueError(f"{qtype} needs rows that are a multiple of {span} values, got {K}")
    original = W.float()
    diag = torch.diag(H)
    slab_fields: list = [None] * (K // span)

    if act_order:
        S, M = torch.empty(N, K), torch.empty(N, K)
        for c0 in range(0, K, span):  # static grids, from the original weights
            s, m, slab_fields[c0 // span] = fit(original[:, c0:c0 + span], diag[c0:c0 + span] if importance else None)
            S[:, c0:c0 + span], M[:, c0:c0 + span] = s, m
        perm = torch.argsort(diag, descending=True, stable=True)
        U = inverse_hessian_factor(H[perm][:, perm], damp)
        Qp, Lp = _walk(original[:, perm].clone(), U, block, lambda col, w1, i: (S[:, perm[col]], M[:, perm[col]]))
        inverse = torch.argsort(perm)
        Q, codes = Qp[:, inverse], Lp[:, inverse]
    else:
        U = inverse_hessian_factor(H, damp) if Hinv is None else Hinv  # (K, K) upper
        grid: dict = {}

        def grid_at(col: int, W1: torch.Tensor, i: int):
            if col % span == 0:  # a new slab: fit its grid to the error-updated weights
                s, m, slab_fields[col // span] = fit(W1[:, i:i + span], diag[col:col + span] if importance else None)
                grid["s"], grid["m"] = s, m
            j = col % span
            return grid["s"][:, j], grid["m"][:, j]

        Q, codes = _walk(original.clone(), U, max(span, block // span * span), grid_at)
    blocks = torch.stack([pack(slab_fields[c0 // span], codes[:, c0:c0 + span]) for c0 in range(0, K, span)], dim=1)
    return GPTQResult(values=Q, packed=blocks.reshape(N, -1).numpy(), error=output_error(original, Q, H))


def _walk(W: torch.Tensor, U: torch.Tensor, block: int, grid_at) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column walk over W (N, K) (updated in place) with the upper Cholesky factor U of
    H^-1; grid_at(col, W1, i) gives the (s, m) grid of column col (W1: the current block, i: the
    column's index in it). Returns (quantized values (N, K), codes uint8 (N, K))."""
    N, K = W.shape
    Q = torch.empty_like(W)
    codes = torch.empty(N, K, dtype=torch.uint8)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # (N, B) current block, updated in place as columns are rounded
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s, m = grid_at(col, W1, i)
            w = W1[:, i]
            L = _round_onto(w, s, m)
            q = s * L - m
            Q[:, col], codes[:, col] = q, L.to(torch.uint8)
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return Q, codes
