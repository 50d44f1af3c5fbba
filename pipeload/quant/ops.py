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

Implementations: the compiled kernels of quant/kernels/ (integer dot products on the blocks as
stored, activations quantized to 8 bits per block as llama.cpp does; `backend()` names the code
path) where a C compiler exists, else the portable one here (torch only: dequantize the rows,
multiply), which is forced in a test so that it keeps working (PIPELOAD_NO_C_KERNELS=1 forces it).
The compiled decode products give every row the same bits at any M (not only up to
EXACT_ROWS), and the same bits on every CPU they run on (AVX512, AVX2, NEON and plain C follow
one order of operations per type).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pipeload.quant import kernels
from pipeload.quant.registry import quant_type_name, row_nbytes

EXACT_ROWS = 64          # rows up to which every row is computed as if it were alone
UNPACK_ROWS = 2048       # weight rows dequantized at a time by the portable path (bounds scratch)
FLOAT_TILE_ROWS = 256    # float weight rows converted at a time for a prompt's float32 GEMM
GEMM_ROWS = 8            # from this many rows, block types run through the kernels' GEMM (same bits)
MIN_PARALLEL_BYTES = 1 << 18  # smaller products run on the calling thread: waking another costs more
_DESC = 6                # int64 fields per weight in a pl_linear call (quant/kernels/api.c)
MAX_WEIGHTS = 16         # weights per pl_linear call (quant/kernels/api.c)


@dataclass
class GGMLWeight:
    """A weight matrix as stored: `blocks` uint8 (N, row_bytes) holding N rows of K values of
    type `qtype` (a view into the bytes read from the file; never copied). `name` (the tensor's
    name in the file) is used in error messages.

    Raises ValueError when the blocks do not hold N rows of K values of `qtype` (shape, dtype,
    row bytes, a row length that is not whole blocks), UnsupportedModelError for a type pipeload
    does not decode.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, int]        # (N, K), torch order: N output rows of K inputs
    blocks: torch.Tensor          # uint8 (N, row_bytes); or rows left on disk (weights/rows.DiskRows)
    name: str = ""

    def __post_init__(self) -> None:
        what = f"weight {self.name!r}" if self.name else "weight"
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"{what}: shape {self.shape} is not (rows, columns) of positive sizes")
        n, k = int(self.shape[0]), int(self.shape[1])
        try:
            rb = row_nbytes(self.qtype, k)
        except ValueError as e:  # ModelFileError / UnsupportedModelError from the sizes table
            raise type(e)(f"{what} of shape {self.shape}: {e}") from None
        b = self.blocks
        if not isinstance(b, torch.Tensor) and hasattr(b, "__getitem__") and tuple(getattr(b, "shape", ())) == (n, rb):
            self.shape = (n, k)  # a table left on disk (DiskRows): only looked up by rows, never multiplied
            return
        if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.dim() != 2 or tuple(b.shape) != (n, rb):
            got = f"{tuple(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{what}: {quant_type_name(self.qtype)} of shape {self.shape} needs uint8 blocks of "
                             f"shape ({n}, {rb}), got {got}")
        if b.stride(1) != 1 or b.device.type != "cpu":
            raise ValueError(f"{what}: blocks must be CPU rows of contiguous bytes (stride {b.stride()})")
        self.shape = (n, k)

    @classmethod
    def trusted_view(cls, qtype: GGMLQuantizationType, shape: tuple[int, int], blocks: torch.Tensor,
                     name: str = "") -> "GGMLWeight":
        """A GGMLWeight built without the checks, for a caller that has built this very layout
        once through the constructor (the expert cache rebuilds an expert's weights over a slot
        every time it is read: the checks cost more than the view)."""
        w = cls.__new__(cls)
        w.qtype, w.shape, w.blocks, w.name = qtype, shape, blocks, name
        return w

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantized(self, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows r0..r1 of the weight as `dtype` (r1 - r0, K), decoded from the blocks."""
        from .formats import dequantize

        r1 = self.shape[0] if r1 is None else r1
        return dequantize(self.blocks[r0:r1], self.qtype, (r1 - r0, self.shape[1]), out_dtype=dtype)


def backend() -> str:
    """Which kernels run the products: "avx512-vnni", "avx2", "neon-dotprod", "neon",
    "generic-c", or "portable (reason)" for the torch path."""
    return kernels.backend()


# ---------------------------------------------------------------------------------------------
# The portable path (torch only)


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
    output (the memory planner counts it). Portable path: UNPACK_ROWS rows dequantized to float32.
    Compiled kernels: a float32 tile of FLOAT_TILE_ROWS rows for a float type's prompt, or each
    thread's unpacked GEMM panel of 32 rows (at most 40 bytes per value) and the quantized
    activations of one prompt chunk, whichever is larger."""
    if kernels.library() is None:
        return min(n, UNPACK_ROWS) * k * 4
    panel = 32 * k * 40 * max(1, torch.get_num_threads())
    return max(min(n, FLOAT_TILE_ROWS) * k * 4, panel) + (1 << 20)


# ---------------------------------------------------------------------------------------------
# The compiled path

_supported: dict[int, bool] = {}
_local = threading.local()
_calls: dict[tuple[str, str], int] = {}  # (code path, type name) -> calls, for the run's figures


def _count(path: str, ws: list[GGMLWeight]) -> None:
    for w in ws:
        key = (path, quant_type_name(w.qtype))
        _calls[key] = _calls.get(key, 0) + 1


def kernel_calls() -> dict[tuple[str, str], int]:
    """A copy of the calls so far per (code path, weight type): paths "decode" (the integer or float
    GEMV kernels), "gemm" (the integer GEMM on blocks, many rows), "float-tile" (float rows
    converted to float32 tiles for torch's GEMM), "portable" (the torch path)."""
    return dict(_calls)


def describe_kernels(since: dict[tuple[str, str], int] | None = None) -> str:
    """Which kernels ran (since the `kernel_calls()` snapshot `since`): e.g.
    "avx512-vnni: decode Q4_K x660, Q6_K x88; gemm Q4_K x154"."""
    since = since or {}
    ran: dict[str, list[str]] = {}
    for (path, name), n in sorted(_calls.items()):
        if n - since.get((path, name), 0) > 0:
            ran.setdefault(path, []).append(f"{name} x{n - since.get((path, name), 0)}")
    body = "; ".join(f"{path} {', '.join(v)}" for path, v in ran.items()) or "no products"
    return f"{backend()}: {body}"


def _compiled(lib, qtype) -> bool:
    """Whether the compiled kernels take this type."""
    q = int(qtype)
    ok = _supported.get(q)
    if ok is None:
        block, size = ctypes.c_int64(), ctypes.c_int64()
        ok = _supported[q] = bool(lib.pl_type_info(q, ctypes.byref(block), ctypes.byref(size)))
    return ok


def _threads(nbytes: int) -> int:
    if nbytes < MIN_PARALLEL_BYTES:
        return 1
    forced = os.environ.get("PIPELOAD_KERNEL_THREADS")
    return int(forced) if forced else max(1, torch.get_num_threads())


def _raise(code: int, what: str) -> None:
    if code == kernels.PL_ENOMEM:
        raise MemoryError(f"{what}: the kernels cannot allocate their activation scratch")
    raise ValueError(f"{what}: the kernels refused the arguments (code {code})")


def _check_input(x: torch.Tensor, w: GGMLWeight) -> None:
    if not isinstance(w.blocks, torch.Tensor):
        raise ValueError(f"linear: the weight {w.name or w.shape!r} is left on disk ({type(w.blocks).__name__}): "
                         f"it can be looked up by rows, not multiplied")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        name = f" {w.name!r}" if w.name else ""
        raise ValueError(f"linear: input of shape {tuple(x.shape)} does not match the weight{name} of shape {w.shape}")


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: float32 or bfloat16 rows of unit stride."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return x.to(torch.float32).contiguous()
    return x if x.stride(1) == 1 else x.contiguous()


def _kernel_linear(lib, x: torch.Tensor, ws: list[GGMLWeight], method: int = 0,
                   out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One pl_linear call for all of ws: the decode products (method 0), the GEMM for block
    types (method 1; the same bits, faster for many rows), or weight i times row i % M only
    (method 2). Each weight's output goes to a new tensor, or to its row(s) of `out`."""
    m, k = x.shape
    x = _kernel_input(x)
    ys = out if out is not None else [torch.empty(m, w.shape[0], dtype=x.dtype) for w in ws]
    desc = (ctypes.c_int64 * (_DESC * len(ws)))()
    nbytes = 0
    for i, (w, y) in enumerate(zip(ws, ys)):
        b = w.blocks
        desc[_DESC * i:_DESC * i + _DESC] = [int(w.qtype), b.data_ptr(), b.stride(0), w.shape[0], y.data_ptr(),
                                             w.shape[0]]
        nbytes += b.numel()
    bf16 = int(x.dtype == torch.bfloat16)
    work = nbytes if method == 2 else nbytes * m  # paired: each weight meets one row
    code = lib.pl_linear(desc, len(ws), x.data_ptr(), bf16, x.stride(0), m, k, bf16, _threads(work), method)
    if code:
        name = "linear_paired" if method == 2 else "linear"
        _raise(code, f"{name} on " + ", ".join(repr(w.name or str(w.shape)) for w in ws))
    return ys


def _float_tile(numel: int) -> torch.Tensor:
    buf = getattr(_local, "tile", None)
    if buf is None or buf.numel() < numel:
        buf = _local.tile = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _float_prompt(lib, x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """Many rows (a prompt) on a float type: FLOAT_TILE_ROWS weight rows at a time converted to
    float32 by the kernels, multiplied by torch's GEMM (oneDNN/MKL)."""
    n, k = w.shape
    xf = x.to(torch.float32)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    b = w.blocks
    for r0 in range(0, n, FLOAT_TILE_ROWS):
        r1 = min(n, r0 + FLOAT_TILE_ROWS)
        tile = _float_tile((r1 - r0) * k).view(r1 - r0, k)  # (rows, K)
        code = lib.pl_dequantize(int(w.qtype), b[r0:r1].data_ptr(), b.stride(0), r1 - r0, k, tile.data_ptr(), 0, k,
                                 _threads(b.stride(0) * (r1 - r0)))
        if code:
            _raise(code, f"dequantize {w.name or w.shape!r}")
        torch.matmul(xf, tile.t(), out=y[:, r0:r1])
    return y.to(x.dtype)


def _is_float(w: GGMLWeight) -> bool:
    return w.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def linear(x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    """x (M, K) float32 or bfloat16 @ W^T -> (M, N) in x's dtype (no bias).

    Raises ValueError when x does not match the weight, MemoryError when the kernels cannot
    allocate their scratch."""
    return linear_many(x, [w])[0]


def linear_many(x: torch.Tensor, ws: list[GGMLWeight]) -> list[torch.Tensor]:
    """[linear(x, w) for w in ws], computed in one pass where the kernels allow (the activation
    is quantized once, one thread-pool job covers every weight's rows)."""
    for w in ws:
        _check_input(x, w)
    lib = kernels.library()
    if lib is None or not all(_compiled(lib, w.qtype) for w in ws):
        _count("portable", ws)
        return [_portable_linear(x, w) for w in ws]
    m = x.shape[0]
    if m > EXACT_ROWS and any(_is_float(w) for w in ws):
        return [linear_many(x, [w])[0] if not _is_float(w) else _counted_float_prompt(lib, x, w) for w in ws]
    if len(ws) > MAX_WEIGHTS:
        return [y for i in range(0, len(ws), MAX_WEIGHTS) for y in linear_many(x, ws[i:i + MAX_WEIGHTS])]
    gemm = m >= GEMM_ROWS and bool(lib.pl_gemm_available())
    for w in ws:
        _count("gemm" if gemm and not _is_float(w) else "decode", [w])
    return _kernel_linear(lib, x, ws, 1 if m >= GEMM_ROWS else 0)


def linear_paired(x: torch.Tensor, ws: list[GGMLWeight]) -> torch.Tensor:
    """Weight i times row i % M of x (M, K): (len(ws), N), all ws of N rows, in x's dtype.

    The routed experts of a decode step: each expert multiplies the one row routed to it, and
    one kernel call (one activation quantization, one thread-pool job) serves them all, where a
    loop would pay a call per expert. Row i has the bits of `linear(x[i % M:i % M + 1], ws[i])`."""
    m = x.shape[0]
    n = ws[0].shape[0]
    for w in ws:
        _check_input(x, w)
        if w.shape[0] != n:
            raise ValueError(f"linear_paired: weights of {w.shape[0]} and {n} rows cannot share one output")
    lib = kernels.library()
    if lib is None or not all(_compiled(lib, w.qtype) for w in ws):
        _count("portable", ws)
        return torch.cat([_portable_linear(x[i % m:i % m + 1], w) for i, w in enumerate(ws)])
    x = _kernel_input(x)
    y = torch.empty(len(ws), n, dtype=x.dtype)
    _count("decode", ws)
    for c0 in range(0, len(ws), MAX_WEIGHTS):
        chunk = ws[c0:c0 + MAX_WEIGHTS]
        # the kernel pairs weight i of a call with row i % M: rotate x so weight c0 + i meets row (c0 + i) % M
        rows = x if c0 % m == 0 else torch.roll(x, -(c0 % m), 0)
        _kernel_linear(lib, rows, chunk, 2, out=[y[c0 + i:c0 + i + 1] for i in range(len(chunk))])
    return y


def _counted_float_prompt(lib, x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
    _count("float-tile", [w])
    return _float_prompt(lib, x, w)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention (1, 1, H*hd) of one query q (1, H, 1, hd) over k, v (1, Hkv, S, hd), float32
    inside (query head j uses key/value head j // (H // Hkv))."""
    _, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(Hkv, H // Hkv, hd).float()                          # (Hkv, G, hd)
    scores = torch.matmul(qg, k[0].float().transpose(1, 2)) * scale     # (Hkv, G, S)
    out = torch.matmul(torch.softmax(scores, dim=-1), v[0].float())     # (Hkv, G, hd)
    return out.to(q.dtype).reshape(1, 1, H * hd)
