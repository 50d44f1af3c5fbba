"""Byte-range reads into torch buffers, leaving nothing behind in the page cache.

Page cache is memory too. Two ways to read without keeping the model in it:
- "direct": O_DIRECT reads into page-aligned buffers (the kernel copies nothing);
- "buffered": ordinary reads, then posix_fadvise(DONTNEED) on what was read so its pages are
  dropped. The descriptor is marked POSIX_FADV_RANDOM: the kernel reads exactly the ranges asked
  for and no readahead beyond them. (With readahead on, a read in flight on one thread brings back
  the first pages of the next range after another thread has read and dropped them: on a disk with
  8 MB readahead that left a quarter of every streamed layer in the cache after each pass.) Large
  ranges are read in chunks of READ_CHUNK, so at most a chunk per reading thread is in the cache
  at once.
Which is faster depends on the disk; `probe_read_bandwidth` measures both.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError

MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call; stay well below
ALIGN = 4096        # O_DIRECT needs offsets, lengths and addresses aligned to the block size
IO_MODES = ("direct", "buffered")
READ_CHUNK = 8 << 20  # one read call; the page cache a buffered read holds until it is dropped


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of `nbytes` (rounded up to 4096) at a page-aligned address,
    backed by an anonymous mapping (returned to the OS as soon as it is freed)."""
    size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)


def _preadv_into(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + MAX_READ]], offset + done)
        if n == 0:
            break
        done += n
    return done


class RangeReader:
    """Reads byte ranges of model files with pread, keeping one descriptor per file and mode."""

    def __init__(self, drop_cache: bool = True):
        self.drop_cache = drop_cache
        self._fds: dict[tuple[Path, bool], int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path, direct: bool = False) -> int:
        fd = self._fds.get((path, direct))
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as e:
                raise ModelFileError(f"{path}: cannot open: {e.strerror}") from None
            if self.drop_cache and not direct:  # no readahead past what is read (and dropped)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[(path, direct)] = fd
        return fd

    def read_into(self, path: Path, offset: int, out: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """Fill the contiguous uint8 tensor `out` from `path` at `offset`; raises if the file is short.

        With direct=True, `out`'s address, `offset` and `out`'s length must be 4096-aligned
        (the read may stop short at the end of the file; the rest of `out` is left as it was)."""
        fd = self._fd(path, direct)
        view = memoryview(out.numpy()).cast("B")
        got = _preadv_into(fd, view, offset)
        if got != len(view) and not (direct and got > 0 and offset + got == os.fstat(fd).st_size):
            raise ModelFileError(f"{path}: truncated: wanted {len(view)} bytes at {offset}, got {got}")
        if self.drop_cache and not direct:
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        self.bytes_read += got
        return out

    def read(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """A new uint8 tensor holding `nbytes` bytes of `path` at `offset`."""
        return self.read_into(path, offset, torch.from_numpy(np.empty(nbytes, dtype=np.uint8)))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_span(reader: RangeReader, path: Path, offset: int, out: torch.Tensor, mode: str,
              pool: ThreadPoolExecutor | None = None, chunk: int = READ_CHUNK) -> None:
    """Fill `out` with the file bytes at `offset`, split in `chunk`-sized reads, run on `pool`
    if given (several reads in flight keep the disk's queue full), else one after another (a
    buffered read then holds at most one chunk in the page cache). For mode "direct", offset
    and out must be aligned."""
    direct = mode == "direct"
    n = out.numel()
    if pool is None or n <= chunk:
        for s in range(0, max(n, 1), chunk):
            reader.read_into(path, offset + s, out[s:min(n, s + chunk)], direct)
        return
    futures = [pool.submit(reader.read_into, path, offset + s, out[s:min(n, s + chunk)], direct)
               for s in range(0, n, chunk)]
    for f in futures:
        f.result()


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget every cached page of `path` (for cold-read measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probe_read_bandwidth(path: Path, nbytes: int = 256 << 20, threads: int = 2) -> dict[str, float]:
    """Cold read bandwidth (bytes/s) of `path` in each mode, over up to `nbytes` from its middle."""
    size = path.stat().st_size
    n = min(nbytes, size) // ALIGN * ALIGN
    start = (size - n) // 2 // ALIGN * ALIGN
    if n < ALIGN:
        return {mode: float("nan") for mode in IO_MODES}
    buf = aligned_buffer(n)
    result = {}
    with RangeReader() as reader, ThreadPoolExecutor(threads) as pool:
        for mode in IO_MODES:
            drop_from_page_cache(path)
            t0 = time.perf_counter()
            read_span(reader, path, start, buf[:n], mode, pool)
            result[mode] = n / (time.perf_counter() - t0)
    return result
