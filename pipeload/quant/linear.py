"""Quantized linear layers that compute on packed weights (drop-in for models.common.Linear).

Two kernel-native formats, both PyTorch CPU kernels with bf16 activations:
- Int4Linear: 4-bit weights in groups with a (scale, zero) pair per group,
  weight = (q - 8) * scale + zero, through `aten._weight_int4pack_mm_for_cpu`.
- Int8Linear: 8-bit weights with one scale per output row, through `aten._weight_int8pack_mm`.

For one or a few tokens (decode) the packed kernels read 4 or 8 bits per weight and are the
fast path. For many tokens (a prompt) the weight is unpacked once to bf16 and multiplied with
`F.linear`, whose blocked GEMM is faster there (the crossover, PREFILL_ROWS, was measured).
The tensors are buffers, so the loader can attach views into a streaming buffer.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

INT4_TILE_N = 64  # rows per tile of the CPU int4pack layout
PREFILL_ROWS = 8  # at or above this many token rows, unpack to bf16 and use F.linear (8-bit weights)
INT4_PREFILL_ROWS = 32  # the same for 4-bit weights on the compiled decode kernel (16 on PyTorch's)
# measured with bench shapes of a 1.1B Llama (2048 x 5632, 2 threads): the int8 decode product costs
# as much as unpack + GEMM at 6-8 rows, the int4 one at 32-64 rows (it reads half the bytes)
UNPACK_ROWS = 2048  # weight rows unpacked at a time for prompts: bounds the scratch memory


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


class Linear(nn.Module):
    """y = x @ W^T + b with W of shape (out_features, in_features); weights assigned at load."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


_local = threading.local()


def _c_kernels() -> bool:
    """Whether the compiled unpacking kernels (quant/ckernels.py) are in use."""
    from . import ckernels

    return ckernels.available()


def _c_decode() -> bool:
    """Whether few-row products use the compiled kernels with 8-bit activations (as llama.cpp
    does; PIPELOAD_DECODE=torch keeps PyTorch's packed kernels with bf16 activations)."""
    mode = getattr(_local, "decode", None)
    if mode is None:
        import os

        mode = _local.decode = os.environ.get("PIPELOAD_DECODE", "c") != "torch" and _c_kernels()
    return mode


def _scratch(k: int, n: int) -> torch.Tensor:
    """A bf16 (k, n) buffer reused by this thread's prompt products (no page faults per call)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < k * n:
        buf = _local.buf = torch.empty(k * n, dtype=torch.bfloat16)
    return buf[:k * n].view(k, n)


def concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module whose output is the parts' outputs side by side (their rows stacked), or None
    when they do not share one kernel format (Int4 with one group size, Int8, or float of one
    dtype) and bias layout. Each output keeps its bits: the kernels compute rows independently."""
    first = parts[0]
    kind = type(first)
    if any(type(p) is not kind for p in parts) or any((p.bias is None) != (first.bias is None) for p in parts):
        return None
    if any(p.in_features != first.in_features for p in parts):
        return None
    n = sum(p.out_features for p in parts)
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    if kind is Int4Linear:
        if any(p.group_size != first.group_size for p in parts):
            return None
        new = Int4Linear(first.in_features, n, first.group_size)
        new.qweight = torch.cat([p.qweight for p in parts])                  # whole 64-row tiles
        new.scales_zeros = torch.cat([p.scales_zeros for p in parts], dim=1)  # (K/G, N, 2)
    elif kind is Int8Linear:
        new = Int8Linear(first.in_features, n)
        new.qweight = torch.cat([p.qweight for p in parts])
        new.scales = torch.cat([p.scales for p in parts])
    elif kind is Linear:
        if any(p.weight.dtype != first.weight.dtype for p in parts):
            return None
        new = Linear(first.in_features, n)
        new.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=False)
        return new
    else:
        return None
    if bias is not None:
        new.register_buffer("bias", bias)
    return new


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the CPU kernel's layout for integer weights q in 0..15 of shape [N, K]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int4 (N a multiple of 64): uint8 [N, K] values 0..15.

    The layout tiles rows by 64; within a tile, for each k, 32 bytes hold rows i (low nibble)
    and i + 32 (high nibble)."""
    tiles = packed.reshape(n // INT4_TILE_N, k, INT4_TILE_N // 2)  # (N/64, K, 32)
    lo, hi = tiles & 15, tiles >> 4
    return torch.cat((lo, hi), dim=2).transpose(1, 2).reshape(n, k)


class _PackedLinear(nn.Module):
    """Shared forward of the packed formats: packed kernel for few rows, chunked unpack + GEMM for many."""

    in_features: int
    out_features: int

    def dequantized(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ W^T for many rows: the weight unpacked to bf16, UNPACK_ROWS rows at a time."""
        if _c_kernels():
            return self._in_row_blocks(x2, self.scratch_product)
        return self._in_row_blocks(x2, lambda x, r0, r1: F.linear(x, self.dequantized(r0, r1)))

    def scratch_product(self, x2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """x2 @ (rows r0..r1 of W)^T with the rows unpacked by the compiled kernels into scratch."""
        raise NotImplementedError

    def _in_row_blocks(self, x2: torch.Tensor, product) -> torch.Tensor:
        n = self.out_features
        out = [product(x2, r0, min(n, r0 + UNPACK_ROWS)) for r0 in range(0, n, UNPACK_ROWS)]  # (M, rows) each
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)  # (M, N)

    def prefill_rows(self) -> int:
        """Token rows from which the product unpacks the weight and uses the GEMM."""
        return PREFILL_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] >= self.prefill_rows():
            y = self.prefill_mm(x2)
        else:
            y = self.packed_mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(_PackedLinear):
    """4-bit group-quantized linear layer; N must be a multiple of 64, K of the group size."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False):
        super().__init__()
        if out_features % INT4_TILE_N or in_features % group_size:
            raise ValueError(f"Int4Linear needs out_features % {INT4_TILE_N} == 0 and in_features % group == 0, "
                             f"got {out_features}x{in_features} with group {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", _meta(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", _meta(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", _meta(out_features, dtype=torch.bfloat16) if bias else None)

    def prefill_rows(self) -> int:
        return INT4_PREFILL_ROWS if self.group_size == 32 and _c_decode() else 16

    @staticmethod
    def can_hold(out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % INT4_TILE_N == 0 and in_features % group_size == 0

    def dequantized(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0..r1 of the weight as bf16 (r1 - r0, K); r0, r1 multiples of 64 (whole tiles)."""
        r1 = self.out_features if r1 is None else r1
        if _c_kernels():
            return self._unpacked_t(r0, r1).t()  # the same values, transposed in memory
        q = unpack_int4(self.qweight[r0:r1], r1 - r0, self.in_features)
        G = self.group_size
        sz = self.scales_zeros[:, r0:r1].transpose(0, 1)  # (rows, K/G, 2)
        w = (q.view(r1 - r0, -1, G).to(torch.bfloat16) - 8) * sz[..., :1] + sz[..., 1:]
        return w.view(r1 - r0, self.in_features)

    def _unpacked_t(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W^T of rows r0..r1 as bf16 (K, r1 - r0), by the compiled kernel (into `out` if given)."""
        from . import ckernels

        return ckernels.unpack_int4_t_bf16(self.qweight[r0:r1], self.scales_zeros[:, r0:r1], r1 - r0,
                                           self.in_features, self.group_size, out=out)

    def scratch_product(self, x2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return x2 @ self._unpacked_t(r0, r1, _scratch(self.in_features, r1 - r0))

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.group_size == 32 and _c_decode():
            from . import ckernels

            return ckernels.gemv_int4(x2, self.qweight, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_zeros)


class Int8Linear(_PackedLinear):
    """8-bit linear layer with one scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", _meta(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", _meta(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", _meta(out_features, dtype=torch.bfloat16) if bias else None)

    def dequantized(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0..r1 of the weight as bf16 (r1 - r0, K)."""
        r1 = self.out_features if r1 is None else r1
        if _c_kernels():
            from . import ckernels

            return ckernels.int8_to_bf16(self.qweight[r0:r1], self.scales[r0:r1])
        return self.qweight[r0:r1].to(torch.bfloat16) * self.scales[r0:r1, None]

    def scratch_product(self, x2: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        from . import ckernels

        w = ckernels.int8_to_bf16(self.qweight[r0:r1], self.scales[r0:r1], _scratch(r1 - r0, self.in_features))
        return F.linear(x2, w)

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.in_features % 32 == 0 and _c_decode():
            from . import ckernels

            return ckernels.gemv_int8(x2, self.qweight, self.scales)
        return torch._weight_int8pack_mm(x2, self.qweight, self.scales)
