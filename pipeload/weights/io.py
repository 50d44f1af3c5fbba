"""Byte-range reads into torch buffers, leaving nothing behind in the page cache.

Page cache is memory too: after a range is read, its pages are dropped with
posix_fadvise(DONTNEED), so a model's bytes live only where pipeload put them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError

MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call; stay well below


def _preadv_into(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + MAX_READ]], offset + done)
        if n == 0:
            break
        done += n
    return done


class RangeReader:
    """Reads byte ranges of model files with pread, keeping one descriptor per file."""

    def __init__(self, drop_cache: bool = True):
        self.drop_cache = drop_cache
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ModelFileError(f"{path}: cannot open: {e.strerror}") from None
            self._fds[path] = fd
        return fd

    def read_into(self, path: Path, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous uint8 tensor `out` from `path` at `offset`; raises if the file is short."""
        fd = self._fd(path)
        view = memoryview(out.numpy()).cast("B")
        got = _preadv_into(fd, view, offset)
        if got != len(view):
            raise ModelFileError(f"{path}: truncated: wanted {len(view)} bytes at {offset}, got {got}")
        if self.drop_cache:
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
