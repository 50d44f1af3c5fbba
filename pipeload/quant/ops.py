"""The compute operations model code calls on weights: the one boundary between pure-torch
architectures and pipeload's compiled kernels.

A weight matrix is a `GGMLWeight`: the tensor exactly as the file stores it (GGUF blocks of any
supported type, or F32/F16/BF16 rows from GGUF or safetensors), as a uint8 view into the bytes
that were read. Nothing is re-encoded: a resident layer and a streamed layer hold the same bytes
and run the same arithmetic.

    linear(x, w)          y = x @ W^T                      (M, K) -> (M, N)
    linear_many(x, ws)    [x @ W_j^T for each j], one pass  fused q/k/v, gate/up
    attend_one(q, k, v)   attention of one query token over a KV cache slice

Contract (tests hold every implementation to it):
- Row exactness: for M <= EXACT_ROWS, output row r depends only on input row r and the weight:
  not on M, not on the other rows, not on the thread count. A batch of sequences decoded
  together therefore gets the bits each would get alone, with no splitting by the caller.
- Above EXACT_ROWS rows (prompts) any deterministic method may be used; callers that need
  exactness there run one sequence per call.
- Bad arguments (shape mismatch, wrong byte count, unknown type) raise ValueError /
  UnsupportedModelError before any memory is touched.

This file holds the interface and the portable implementation (torch only: dequantize the
rows, multiply). The compiled kernels (quant/kernels/, loaded by quant/ckernels.py) replace the
bodies where they are available; the portable path stays as the fallback when no compiler
exists, and is forced in a test so that it keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

EXACT_ROWS = 64          # rows up to which every row is computed as if it were alone
UNPACK_ROWS = 2048       # weight rows dequantized at a time in the portable path (bounds scratch)


@dataclass
class GGMLWeight:
    """A weight matrix as stored: `blocks` uint8 (N, row_bytes) holding N rows of K values of
    type `qtype` (a view into the bytes read from the file; never copied)."""

    qtype: GGMLQuantizationType
    shape: tuple[int, int]        # (N, K), torch order: N output rows of K inputs
    blocks: torch.Tensor          # uint8 (N, row_bytes)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantized(self, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0..r1 of the weight as `dtype` (r1 - r0, K), decoded from the blocks."""
        from .formats import dequantize

        r1 = self.shape[0] if r1 is None else r1
        return dequantize(self.blocks[r0:r1], self.qtype, (r1 - r0, self.shape[1]), out_dtype=dtype)


def _portable_linear(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """x (M, K) @ W^T by dequantizing rows of W; row-exact for M <= EXACT_ROWS by computing
    each row on its own (one GEMV each: slow, but the same bits whatever M is)."""
    n = w.shape[0]
    xf = x.to(torch.float32)
    outs = []
    for r0 in range(0, n, UNPACK_ROWS):
        r1 = min(n, r0 + UNPACK_ROWS)
        wr = w.dequantized(r0, r1)  # (rows, K) float32
        if x.shape[0] <= EXACT_ROWS:
            outs.append(torch.cat([F.linear(xf[i:i + 1], wr) for i in range(x.shape[0])]))
        else:
            outs.append(F.linear(xf, wr))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (M, N)
    return y.to(x.dtype)


def scratch_bytes(n: int, k: int) -> int:
    """Most temporary memory one linear() call on an (n, k) weight may hold beside its input and
    output (the memory planner counts it): the portable path dequantizes UNPACK_ROWS rows to float32."""
    return min(n, UNPACK_ROWS) * k * 4


def linear(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """x (M, K) float32 or bfloat16 @ W^T -> (M, N) in x's dtype (no bias)."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: input of shape {tuple(x.shape)} does not match a weight of shape {w.shape}")
    return _portable_linear(x, w)


def linear_many(x: torch.Tensor, ws: list[GGMLWeight]) -> list[torch.Tensor]:
    """[linear(x, w) for w in ws], computed in one pass where the kernels allow (the activation
    is quantized once, one thread-pool job covers every weight's rows)."""
    return [linear(x, w) for w in ws]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention (1, 1, H*hd) of one query q (1, H, 1, hd) over k, v (1, Hkv, S, hd), float32
    inside (query head j uses key/value head j // (H // Hkv))."""
    _, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(Hkv, H // Hkv, hd).float()                          # (Hkv, G, hd)
    scores = torch.matmul(qg, k[0].float().transpose(1, 2)) * scale     # (Hkv, G, S)
    out = torch.matmul(torch.softmax(scores, dim=-1), v[0].float())     # (Hkv, G, hd)
    return out.to(q.dtype).reshape(1, 1, H * hd)
