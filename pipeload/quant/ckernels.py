"""The C unpacking kernels of kernels.c, compiled on first use for this machine and loaded with ctypes.

Compiled once with the system C compiler (cc/gcc, `-O3 -march=native`) into
~/.cache/pipeload/kernels/ (PIPELOAD_KERNEL_CACHE overrides), keyed by the source's hash and the
CPU, so a copy built elsewhere is never loaded. Without a compiler, `available()` is False and
quant/linear.py unpacks with torch operations instead (same values, several times slower).
The work is split over torch's thread count by the C side's own thread pool (see kernels.c).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("kernels.c")
_lib = None
_failed: str | None = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("PIPELOAD_KERNEL_CACHE", Path.home() / ".cache" / "pipeload" / "kernels"))


def _cpu_id() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return platform.machine() + flags


def _build() -> ctypes.CDLL:
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + _cpu_id().encode()).hexdigest()[:16]
    out = _cache_dir() / f"pipeload_kernels_{key}.so"
    if not out.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc/gcc) to build the unpacking kernels")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        cmd = [cc, "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", str(_SOURCE), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"building the unpacking kernels failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.unpack_int4_t_bf16.argtypes = [p, p, p, i64, i64, i64, i64, i64]
    lib.quantize_act_q8.argtypes = [p, p, p, p, i64, i64]
    lib.gemv_int4.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64]
    i32 = ctypes.c_int
    lib.gemv_int4_mt.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
    lib.gemv_int8_mt.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.unpack_int4_t_bf16_mt.argtypes = [p, p, p, i64, i64, i64, i32]
    lib.int8_to_bf16_mt.argtypes = [p, p, p, i64, i64, i32]
    lib.linear_int4.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.linear_int8.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.attend_one_mt.argtypes = [p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, p, i32]
    lib.gemv_int8.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be built here (the reason: `failure()`)."""
    global _lib, _failed
    if _lib is None and _failed is None:
        with _lock:
            if _lib is None and _failed is None:
                if os.environ.get("PIPELOAD_NO_C_KERNELS"):
                    _failed = "disabled by PIPELOAD_NO_C_KERNELS"
                else:
                    try:
                        _lib = _build()
                    except OSError as e:
                        _failed = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def failure() -> str | None:
    library()
    return _failed


MIN_PARALLEL_BYTES = 1 << 19  # smaller products run on the calling thread: waking another costs more


def _threads(nbytes: int = MIN_PARALLEL_BYTES) -> int:
    if nbytes < MIN_PARALLEL_BYTES:
        return 1
    forced = os.environ.get("PIPELOAD_KERNEL_THREADS")
    return int(forced) if forced else max(1, torch.get_num_threads())


def unpack_int4_t_bf16(packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """W^T as bf16 (K, N) from the CPU int4pack layout (N, K/2) and bf16 (K/group, N, 2) scales/zeros."""
    lib = library()
    out = torch.empty(k, n, dtype=torch.bfloat16) if out is None else out
    packed, scales_zeros = packed.contiguous(), scales_zeros.contiguous()
    lib.unpack_int4_t_bf16_mt(packed.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), n, k, group,
                              _threads(2 * n * k))
    return out


def int8_to_bf16(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 (N, K) = qweight int8 (N, K) * scales bf16 (N), rounded as PyTorch's bf16 product."""
    lib = library()
    n, k = qweight.shape
    out = torch.empty(n, k, dtype=torch.bfloat16) if out is None else out
    qweight, scales = qweight.contiguous(), scales.contiguous()
    lib.int8_to_bf16_mt(qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, _threads(2 * n * k))
    return out


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 (M, K), float32 scales (M, K/32), float32 exact block sums (M, K/32)) of x2 (M, K)
    in blocks of 32, as llama.cpp's Q8_0/Q8_1 activations."""
    lib = library()
    xf = x2.float().contiguous()
    m, k = xf.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    xd = torch.empty(m, k // 32, dtype=torch.float32)
    xs = torch.empty(m, k // 32, dtype=torch.float32)
    lib.quantize_act_q8(xf.data_ptr(), xq.data_ptr(), xd.data_ptr(), xs.data_ptr(), m, k)
    return xq, xd, xs


def gemv_int8(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16 (M, N) = x2 (M, K) @ (qweight int8 (N, K) * scales bf16 (N))^T with 8-bit activations
    (x2 bf16, quantized in blocks of 32 inside the kernel). Raises MemoryError if it cannot allocate."""
    n, k = qweight.shape
    x2 = x2.to(torch.bfloat16).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    if library().linear_int8(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), x2.shape[0], n, k,
                             _threads(n * k)):
        raise MemoryError("int8 kernel: cannot allocate the activation buffers")
    return y


def gemv_int4(x2: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """bf16 (M, N) = x2 (M, K) @ W^T for the int4pack layout (group 32) with 8-bit activations."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x2 = x2.to(torch.bfloat16).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    if library().linear_int4(x2.data_ptr(), qweight.data_ptr(), scales_zeros.data_ptr(), y.data_ptr(), x2.shape[0],
                             n, k, _threads(n * k // 2)):
        raise MemoryError("int4 kernel: cannot allocate the activation buffers")
    return y


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention (1, 1, H*hd) bf16 of one query q (1, H, 1, hd) over k, v (1, Hkv, S, hd), bf16, whose
    last dim is contiguous and whose heads are evenly spaced (a slice of the KV cache)."""
    _, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != hd:
        k, v = k.contiguous(), v.contiguous()
    q = q.contiguous()
    out = torch.empty(1, 1, H * hd, dtype=torch.bfloat16)
    library().attend_one_mt(q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(1), H, Hkv, S, hd, scale,
                            out.data_ptr(), _threads(4 * Hkv * S * hd))
    return out

