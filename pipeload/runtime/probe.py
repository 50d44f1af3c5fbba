"""Measuring this machine: memory bandwidth, matmul throughput, disk read bandwidth, free memory.

Physical limits are measured at run time, never assumed: every speed pipeload reports is printed
beside the bound these numbers give (docs/DESIGN.md, "The physical limits").
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ..weights.io import probe_read_bandwidth


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of reading memory, as a sum over a large buffer (what a weight pass does)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / _median(times)


def matmul_flops(dtype: torch.dtype = torch.bfloat16, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a dense n x n matmul (an HPL-style throughput figure)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / _median(times)


def disk_bandwidth(path: Path | None = None, nbytes: int = 256 << 20) -> dict[str, float]:
    """Cold read bandwidth (bytes/s) with O_DIRECT and with buffered+DONTNEED, of `path` (a model
    file) or of a scratch file written in the temp folder."""
    if path is not None and path.is_file() and path.stat().st_size >= 64 << 20:
        return probe_read_bandwidth(path, nbytes)
    folder = Path(os.environ.get("PIPELOAD_PROBE_DIR", tempfile.gettempdir()))
    with tempfile.NamedTemporaryFile(dir=folder, prefix="pipeload-probe-") as f:
        block = os.urandom(8 << 20)
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return probe_read_bandwidth(Path(f.name), nbytes)


def free_memory() -> int:
    """MemAvailable from /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def probe(model_path: Path | None = None) -> dict[str, float]:
    """All figures of this machine in one dict (bytes/s, FLOP/s, bytes)."""
    disk = disk_bandwidth(model_path)
    return {"memory_bandwidth": memory_bandwidth(), "matmul_flops_bf16": matmul_flops(torch.bfloat16),
            "matmul_flops_f32": matmul_flops(torch.float32), "disk_direct": disk["direct"],
            "disk_buffered": disk["buffered"], "free_memory": free_memory(), "threads": torch.get_num_threads()}
