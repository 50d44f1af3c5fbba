"""A token-embedding table left on disk: the rows a batch looks up are read when it looks them up.

An encoder's token table is large beside its layers (all-MiniLM-L6-v2: 47 of its 91 MB) and a
batch uses a few thousand of its rows. Under a tight budget the plan keeps the table in the file
and `DiskRows` stands where the table's bytes would be (`GGMLWeight.blocks`): indexing it with
token ids reads just those rows (each once per lookup, neighbours merged into one read), as
stored, and drops them from the page cache afterwards. models/common.Embedding then decodes them
exactly as it decodes rows of a table in memory, so results are the same bits.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from ..errors import ModelFileError
from .index import TensorRef

MERGE_ROWS = 8  # ids closer than this are read as one range (the rows between are read too)


class DiskRows:
    """The rows of a stored 2-D table (n_rows, row_bytes), read on indexing."""

    def __init__(self, ref: TensorRef):
        n_rows = ref.shape[0]
        if ref.transform is not None or ref.info.nbytes % n_rows:
            raise ModelFileError(f"{ref.info.path}: tensor {ref.name!r} cannot be read by rows")
        self.ref, self.path, self.offset = ref, ref.info.path, ref.info.offset
        self.n_rows, self.row_bytes = n_rows, ref.info.nbytes // n_rows
        self.shape = (n_rows, self.row_bytes)
        self.bytes_read = 0
        self._fd: int | None = None
        self._lock = threading.Lock()

    def numel(self) -> int:
        """Bytes held in memory: none (GGMLWeight.nbytes counts what a weight holds)."""
        return 0

    def _file(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise ModelFileError(f"{self.path}: cannot open: {e.strerror}") from None
        return self._fd

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """uint8 (len(ids), row_bytes): the stored bytes of rows `ids` (int64, any order, repeats)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_rows):
            raise IndexError(f"token id out of range 0..{self.n_rows - 1} of {self.ref.name}")
        unique, inverse = torch.unique(ids, return_inverse=True)  # sorted
        rows = np.empty((unique.numel(), self.row_bytes), dtype=np.uint8)
        u = unique.tolist()
        with self._lock:
            fd = self._file()
            start = 0
            while start < len(u):  # runs of nearby ids: one read each
                end = start + 1
                while end < len(u) and u[end] - u[end - 1] < MERGE_ROWS:
                    end += 1
                first, last = u[start], u[end - 1]
                span = (last - first + 1) * self.row_bytes
                data = os.pread(fd, span, self.offset + first * self.row_bytes)
                if len(data) != span:
                    raise ModelFileError(f"{self.path}: truncated: rows {first}..{last} of {self.ref.name}")
                block = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.row_bytes)
                rows[start:end] = block[np.asarray(u[start:end]) - first]
                self.bytes_read += span
                start = end
            os.posix_fadvise(fd, self.offset, self.n_rows * self.row_bytes, os.POSIX_FADV_DONTNEED)
        return torch.from_numpy(rows)[inverse]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter teardown)
            pass
