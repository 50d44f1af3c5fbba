"""Scale searches used by the K-quant quantizers, vectorised over sub-blocks.

These follow the ideas of llama.cpp's reference quantizers (ggml-quants.c): `scale_min_fit` is
make_qkx2_quants (an asymmetric grid x ~ scale * L - min, chosen by trying a few grid widths and
solving the weighted least squares fit for each), `symmetric_fit` is make_qx_quants with
rmse_type 1 (a signed grid x ~ scale * (L - nmax), choosing among 19 grid widths the one that
maximises the weighted fit). Rows of the inputs are independent sub-blocks; the loops below run
over candidate grid widths, never over blocks. Summation order differs from the C code, so the
bytes are close to llama.cpp's but not identical.
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15  # below this |max|, a sub-block is treated as all zero


def _weighted_error(diff: torch.Tensor, weights: torch.Tensor, use_mad: bool) -> torch.Tensor:
    """Return [m, 1] sum over the last dim of weights * |diff| (use_mad) or weights * diff^2."""
    err = diff.abs_() if use_mad else diff.square_()
    return err.mul_(weights).sum(dim=-1, keepdim=True)


class _Sums:
    """Weighted sums of one sub-block row that the least squares fit needs, all [m, 1]."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        wx = weights * x  # (m, k)
        self.wx = wx
        self.w = weights.sum(dim=1, keepdim=True)
        self.x = wx.sum(dim=1, keepdim=True)
        self.x2 = (wx * x).sum(dim=1, keepdim=True).double()

    def grid(self, L: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (sum w*L, sum w*L^2, sum w*L*x) of grid indices L [m, k]."""
        wl = weights * L  # (m, k)
        sum_l = wl.sum(dim=1, keepdim=True)
        sum_xl = (self.wx * L).sum(dim=1, keepdim=True)
        sum_l2 = wl.mul_(L).sum(dim=1, keepdim=True)
        return sum_l, sum_l2, sum_xl

    def squared_error(self, scale, the_min, sum_l, sum_l2, sum_xl) -> torch.Tensor:
        """Return [m, 1] sum w * (scale * L + the_min - x)^2 from the sums, in float64."""
        s, m = scale.double(), the_min.double()
        return (
            s * s * sum_l2.double()
            + 2 * s * m * sum_l.double()
            - 2 * s * sum_xl.double()
            + m * m * self.w.double()
            - 2 * m * self.x.double()
            + self.x2
        )


def scale_min_fit(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale [m], the_min [m]) fitting x [m, k] as scale * L - the_min, L in [0, nmax].

    the_min >= 0 (the grid always reaches zero). A constant non-negative row gets scale 0 and
    the_min 0. Errors are weighted |error| (use_mad) or weighted squared error; the latter comes
    from the weighted sums of the fit (in float64), saving a pass over the values per candidate.
    """
    sums = _Sums(x, weights)
    x_min = x.amin(dim=1, keepdim=True).clamp_(max=0.0)  # (m, 1)
    x_max = x.amax(dim=1, keepdim=True)  # (m, 1)
    flat = x_max == x_min  # (m, 1) nothing to fit

    def error_of(scale, the_min, L, sum_l, sum_l2, sum_xl):
        if use_mad:
            return _weighted_error(scale * L + the_min - x, weights, True).double()
        return sums.squared_error(scale, the_min, sum_l, sum_l2, sum_xl)

    iscale = nmax / torch.where(flat, 1.0, x_max - x_min)  # (m, 1)
    scale = 1.0 / iscale
    L = torch.round(iscale * (x - x_min)).clamp_(0, nmax)  # (m, k)
    best_error = error_of(scale, x_min, L, *sums.grid(L, weights))  # (m, 1)
    best_min = x_min.clone()

    for step in range(nstep + 1):
        # llama.cpp keeps the best min found so far as the grid origin for the next width
        span = x_max - best_min  # (m, 1)
        usable = span > 0
        iscale = (rmin + rdelta * step + nmax) / torch.where(usable, span, 1.0)
        L = (x - best_min).mul_(iscale).round_().clamp_(0, nmax)  # (m, k)
        sum_l, sum_l2, sum_xl = sums.grid(L, weights)  # (m, 1) each
        det = sums.w * sum_l2 - sum_l * sum_l  # (m, 1)
        ok = usable & (det > 0)
        safe_det = torch.where(ok, det, 1.0)
        this_scale = (sums.w * sum_xl - sums.x * sum_l) / safe_det
        this_min = (sum_l2 * sums.x - sum_l * sum_xl) / safe_det
        positive = this_min > 0  # the grid must reach zero: refit the scale alone
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        error = error_of(this_scale, this_min, L, sum_l, sum_l2, sum_xl)  # (m, 1)
        better = ok & (error < best_error)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        best_min = torch.where(better, this_min, best_min)

    scale = torch.where(flat, 0.0, scale)
    return scale.squeeze(1), (-best_min).squeeze(1)


# the grid widths make_qx_quants tries: nmax + 0.1 * is, is = 0 first, then -9..-1, 1..9
_QX_STEPS = torch.tensor([0] + list(range(-9, 0)) + list(range(1, 10)), dtype=torch.float32) * 0.1


def symmetric_fit(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale [m], L [m, k]) fitting x [m, k] as scale * (L - nmax), L integer in [0, 2*nmax).

    The value of largest magnitude maps to L = 0 (-nmax), so scale has the opposite sign of it.
    All-zero rows (max |x| < GROUP_MAX_EPS) get scale 0 and L = nmax.
    """
    idx = x.abs().argmax(dim=1, keepdim=True)  # (m, 1) first largest |x|
    x_max = x.gather(1, idx)  # (m, 1) signed
    zero = x_max.abs() < GROUP_MAX_EPS  # (m, 1)
    safe_max = torch.where(zero, 1.0, x_max)
    iscales = -(nmax + _QX_STEPS.to(x.device)) / safe_max  # (m, 19) candidate inverse scales
    L = torch.round(iscales.unsqueeze(2) * x.unsqueeze(1)).clamp_(-nmax, nmax - 1)  # (m, 19, k)
    wl = weights.unsqueeze(1) * L  # (m, 19, k)
    sum_lx = (wl * x.unsqueeze(1)).sum(dim=2)  # (m, 19)
    sum_l2 = (wl * L).sum(dim=2)  # (m, 19)
    fit = torch.where(sum_l2 > 0, sum_lx * sum_lx / torch.where(sum_l2 > 0, sum_l2, 1.0), -1.0)  # (m, 19)
    best = fit.argmax(dim=1, keepdim=True)  # (m, 1) first best width
    sum_lx = sum_lx.gather(1, best)  # (m, 1)
    sum_l2 = sum_l2.gather(1, best)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, 1.0), 0.0)  # (m, 1)
    L = L.gather(1, best.unsqueeze(2).expand(-1, 1, x.shape[1])).squeeze(1) + nmax  # (m, k)
    scale = torch.where(zero, 0.0, scale)
    L = torch.where(zero, float(nmax), L)
    return scale.squeeze(1), L
