"""Where one tensor's bytes live in a model file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TensorInfo:
    """A tensor stored in a file: `nbytes` bytes at absolute `offset`, decoded by `dtype`.

    `dtype` is a GGML type name for GGUF tensors ("F16", "Q4_K", ...) or a safetensors dtype
    name ("F32", "BF16", "I64", ...); the two vocabularies agree on F32, F16 and BF16.
    `shape` is in torch order (rows first, the contiguous dimension last).
    """

    name: str
    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def end(self) -> int:
        return self.offset + self.nbytes
