"""The compiled kernels on GGUF blocks (the C files beside this module), built on first use and
loaded with ctypes.

Built once with the system C compiler (`cc`/`gcc`, or $CC) into ~/.cache/pipeload/kernels/
(PIPELOAD_KERNEL_CACHE overrides), keyed by the sources' hash, the compiler's version, the flags
and the CPU's flags, so a copy built elsewhere is never loaded. Variants:

- "native": `-march=native`, the SIMD kernels this CPU allows (AVX512-VNNI, AVX2, NEON with or
  without dotprod); what `library()` returns and `quant/ops.py` uses.
- "avx2" (x86 with AVX2/FMA/F16C) and "generic" (plain C): the other code paths, built on
  demand so the tests check every path this machine can run against the same definition.

Without a compiler, or with PIPELOAD_NO_C_KERNELS=1, `library()` is None and quant/ops.py runs its
portable torch path; a failed build is reported once as a warning naming the compiler's error.
`backend()` names what runs: "avx512-vnni", "avx2", "neon-dotprod", "neon", "generic-c", or
"portable (reason)".
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

_DIR = Path(__file__).parent
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
VARIANT_FLAGS = {"native": ["-march=native"], "avx2": ["-march=haswell"], "generic": ["-march=native", "-DPL_GENERIC"]}

# activation formats (pl.h)
ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 1, 2, 3
# error codes (pl.h)
PL_ENOMEM, PL_EARG, PL_ETYPE = -1, -2, -3

_libs: dict[str, ctypes.CDLL | None] = {}
_failures: dict[str, str] = {}
_lock = threading.Lock()


def sources() -> list[Path]:
    """The C sources compiled into the library (not the test drivers)."""
    return sorted(_DIR.glob("*.c"))


def _cache_dir() -> Path:
    return Path(os.environ.get("PIPELOAD_KERNEL_CACHE", Path.home() / ".cache" / "pipeload" / "kernels"))


def _cpu_id() -> str:
    """The CPU's model and flags (a library built for other flags may not run here)."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name", "CPU part")):
                    lines.append(line.strip())
                if len(lines) >= 4:
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) to build the kernels")
    return cc


def _build(variant: str) -> ctypes.CDLL:
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    srcs = sources()
    h = hashlib.sha256()
    for path in srcs + sorted(_DIR.glob("*.h")):
        h.update(path.name.encode() + path.read_bytes())
    flags = FLAGS + VARIANT_FLAGS[variant]
    h.update((version + " ".join(flags) + _cpu_id()).encode())
    out = _cache_dir() / f"pipeload_gguf_{variant}_{h.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        cmd = [cc, *flags, *map(str, srcs), "-o", str(tmp), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise OSError(f"building the kernels failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pl_backend.restype = ctypes.c_char_p
    lib.pl_linear.argtypes = [p, i32, p, i32, i64, i64, i64, i32, i32, i32]
    lib.pl_dequantize.argtypes = [i32, p, i64, i64, i64, p, i32, i64, i32]
    lib.pl_quantize_activations.argtypes = [i32, p, i64, i64, p, p, p, p]
    lib.pl_type_info.argtypes = [i32, p, p]
    lib.pl_read_bytes.argtypes = [p, i64, i32]
    lib.pl_read_bytes.restype = ctypes.c_uint64
    return lib


def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernels of `variant`, or None when they cannot be built here (`failure()` says why).

    The first failure to build the native kernels is reported as a warning with the compiler's error.
    """
    if variant in _libs:
        return _libs[variant]
    with _lock:
        if variant not in _libs:
            lib = None
            if os.environ.get("PIPELOAD_NO_C_KERNELS"):
                _failures[variant] = "disabled by PIPELOAD_NO_C_KERNELS"
            else:
                try:
                    lib = _build(variant)
                except OSError as e:
                    _failures[variant] = str(e)
                    if variant == "native":
                        warnings.warn(f"pipeload: compiled kernels unavailable, using the portable torch path "
                                      f"(slow): {e}", RuntimeWarning, stacklevel=3)
            _libs[variant] = lib
    return _libs[variant]


def failure(variant: str = "native") -> str | None:
    """Why `library(variant)` is None (None when it loaded)."""
    library(variant)
    return _failures.get(variant)


def backend() -> str:
    """Which kernels ops runs: the compiled path's name, or "portable (reason)"."""
    lib = library()
    if lib is None:
        reason = failure() or "unknown"
        return f"portable ({reason.splitlines()[0]})"
    return lib.pl_backend().decode()


def read_bandwidth(nbytes: int = 512 << 20, threads: int = 2, repeats: int = 7) -> float:
    """Bytes/s at which the kernels' threads read memory (the ceiling of a memory-bound product):
    the median of `repeats` passes over a buffer far larger than the caches."""
    import statistics
    import time

    import torch

    lib = library()
    if lib is None:
        raise OSError(f"no compiled kernels: {failure()}")
    nbytes = nbytes // 128 * 128  # the kernel reads whole 128-byte lines (and refuses anything else)
    if nbytes < 1 << 20:
        raise ValueError(f"read_bandwidth: give at least 1 MiB to read, got {nbytes} bytes")
    buf = torch.ones(nbytes, dtype=torch.uint8)
    lib.pl_read_bytes(buf.data_ptr(), nbytes, threads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.pl_read_bytes(buf.data_ptr(), nbytes, threads)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def variants() -> list[str]:
    """The kernel variants this machine can run (each checked against the same definition by the tests)."""
    out = ["native", "generic"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = set(open("/proc/cpuinfo").read().split())
        except OSError:
            flags = set()
        if {"avx2", "fma", "f16c"} <= flags:
            out.append("avx2")
    return out
