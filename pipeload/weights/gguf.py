"""GGUF reader: metadata and tensor byte ranges, without loading tensor data.

The header is parsed from a read-only memory map that is closed afterwards, so opening a
30 GB file touches only its first few megabytes; their pages (and what the kernel read around
them) are dropped from the page cache afterwards. Every length, count, shape and offset read
from the file is checked against the file size before it is used: a truncated or corrupt file
raises `ModelFileError` naming the problem, never an IndexError or a huge allocation.

Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFileError, UnsupportedModelError
from .tensor_info import TensorInfo

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
HEADER_READAROUND = 32 << 20  # beyond the header, what faults on its pages may have read (4x an 8 MB readahead)

# GGUF metadata value types -> struct format (scalars) ; 8 = string, 9 = array
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def ggml_type_name(ggml_type: int) -> str:
    """Name of a GGML tensor type ("Q4_K"); raises UnsupportedModelError for unknown numbers."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        raise UnsupportedModelError(f"unknown GGML tensor type {ggml_type}") from None


def ggml_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this GGML type and torch-order shape occupies; raises on bad row length."""
    name = ggml_type_name(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise ModelFileError(f"row length {row} is not a multiple of the {name} block size {block_size}")
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * (row // block_size) * type_size


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: corrupt or truncated GGUF file: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but the file ends at byte {self.size}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        raw = bytes(self.buf[start:start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _NUMPY_DTYPES:
                import numpy as np

                itemsize = np.dtype(_NUMPY_DTYPES[etype]).itemsize
                if count > (self.size - self.pos) // itemsize:
                    raise self.fail(f"{what}: array of {count} items runs past the end of the file")
                start = self.take(count * itemsize, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY_DTYPES[etype], count=count, offset=start)
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype not in (_STRING, _ARRAY):
                raise self.fail(f"{what}: unknown array element type {etype}")
            # every element needs at least 8 bytes (a length or a type+length), so bound the count
            if count > (self.size - self.pos) // 8:
                raise self.fail(f"{what}: array of {count} items runs past the end of the file")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata, tensor infos with absolute byte ranges, file size."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    alignment: int
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: GGUF file has no general.architecture")
        return arch


def is_gguf(path: Path) -> bool:
    """True if the file starts with the GGUF magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header; raises ModelFileError if it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            parsed = _parse(memoryview(mm), path, size)
        # the kernel read around the header's pages (up to its readahead window past them): drop them all
        os.posix_fadvise(f.fileno(), 0, parsed.data_offset + HEADER_READAROUND, os.POSIX_FADV_DONTNEED)
    return parsed


def _parse(buf: memoryview, path: Path, size: int) -> GGUFFile:
    try:
        return _parse_header(_Cursor(buf, path), path, size)
    finally:
        buf.release()


def _parse_header(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelFileError(
            f"{path}: unsupported GGUF version {version}{hint}; pipeload reads versions 2 and 3")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each key/value needs >= 12 bytes and each tensor info >= 24: reject absurd counts early
    if n_kv > size // 12 or n_tensors > size // 24:
        raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than fit in the file")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    raw_infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        raw_infos.append((name, dims, ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in raw_infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        n_elements = 1
        for d in dims:
            if d <= 0 or d > size * 8:  # no tensor can hold more elements than 8x the file's bytes (1-bit)
                raise cur.fail(f"tensor {name!r} has impossible shape {dims}")
            n_elements *= d
        if n_elements > size * 8:
            raise cur.fail(f"tensor {name!r} with shape {dims} cannot fit in a {size}-byte file")
        shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
        type_name = ggml_type_name(ggml_type)
        nbytes = ggml_nbytes(ggml_type, shape)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
        start = data_offset + offset
        if start + nbytes > size:
            raise ModelFileError(
                f"{path}: truncated GGUF file: tensor {name!r} ({type_name}, shape {list(shape)}) "
                f"needs bytes {start}..{start + nbytes} but the file has {size} bytes")
        tensors[name] = TensorInfo(name=name, path=path, offset=start, nbytes=nbytes, shape=shape, dtype=type_name)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors,
                    data_offset=data_offset, alignment=alignment, file_size=size)
