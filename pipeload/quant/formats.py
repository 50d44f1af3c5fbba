"""Bytes in, tensors out: dequantize and quantize whole GGML tensors with the format registry.

Importing this module registers every supported format (floats, legacy and K-quants).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from pipeload.errors import ModelFileError, UnsupportedModelError
from pipeload.quant import floats, kquants, legacy  # noqa: F401  (importing registers the formats)
from pipeload.quant.registry import format_for, quant_type_name, row_nbytes, tensor_nbytes

# Blocks are processed in chunks of about this many output values: big enough for torch's
# threads to share, small enough that the temporaries stay in cache and memory stays flat.
_DEQUANT_CHUNK_VALUES = 1 << 20  # 4 MB of float32
_QUANT_CHUNK_VALUES = 1 << 16


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    """Return `data` as a flat contiguous uint8 tensor (a view when possible)."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of bytes, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data.contiguous().view(-1)


def dequantize(
    data: torch.Tensor,
    qtype: int | GGMLQuantizationType,
    shape: tuple[int, ...],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the values (`out_dtype`, torch `shape`) of a GGML tensor held in the bytes `data`.

    `data` is flat or 2-D uint8 holding exactly the tensor's bytes; `shape` is rows-major with
    the row length last. The result is new memory, or `out` (contiguous, of `shape`; its dtype
    wins over `out_dtype`) filled in place; reuse `out` for speed, fresh memory costs page
    faults. It never aliases `data`. Float32 results are bit-identical with gguf-py's
    `gguf.quants.dequantize` (NaNs from corrupt scales are NaN in both, but where two NaNs meet
    the surviving payload bits may differ).
    Raises UnsupportedModelError for a type pipeload does not decode, ModelFileError when the
    row length is not a whole number of blocks or `data` has the wrong number of bytes.
    """
    fmt = format_for(qtype)
    shape = tuple(int(s) for s in shape)
    nbytes = tensor_nbytes(fmt.qtype, shape)
    flat = _as_bytes(data)
    if flat.numel() != nbytes:
        raise ModelFileError(
            f"{fmt.qtype.name} tensor of shape {shape} needs {nbytes} bytes, got {flat.numel()}"
        )
    if out is None:
        out = torch.empty(shape, dtype=out_dtype)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {shape}, got {tuple(out.shape)}")
    blocks = flat.view(-1, fmt.type_size)  # (n_blocks, type_size)
    values = out.view(-1, fmt.block_size)  # (n_blocks, block_size)
    step = max(1, _DEQUANT_CHUNK_VALUES // fmt.block_size)
    direct = out.dtype == torch.float32
    scratch = None if direct else torch.empty((min(step, blocks.shape[0]), fmt.block_size))
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step]  # (m, type_size)
        target = values[start : start + step]  # (m, block_size)
        if direct:
            fmt.dequantize_blocks(chunk, out=target)
        else:
            target.copy_(fmt.dequantize_blocks(chunk, out=scratch[: chunk.shape[0]]))
    return out


def quantize(x: torch.Tensor, qtype: int | GGMLQuantizationType) -> torch.Tensor:
    """Return uint8 [rows, row_nbytes] packing float x [rows, cols] (or [cols]) as GGML `qtype`.

    Leading dims are flattened into rows. Raises UnsupportedModelError for types pipeload cannot
    write or a row length that is not a multiple of the type's block size, ModelFileError when a
    block type is asked to store NaN or infinite values.
    """
    fmt = format_for(qtype)
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if x.dim() == 0:
        x = x.view(1)
    cols = x.shape[-1]
    if cols % fmt.block_size != 0:
        raise UnsupportedModelError(
            f"cannot quantize rows of length {cols} to {fmt.qtype.name}: "
            f"not a multiple of its block size {fmt.block_size}"
        )
    if fmt.block_size > 1 and not bool(torch.isfinite(x).all()):
        bad = x[~torch.isfinite(x)][0].item()
        raise ModelFileError(
            f"cannot quantize to {fmt.qtype.name}: the tensor holds non-finite values ({bad})"
        )
    rows = x.reshape(-1, cols)  # (rows, cols)
    blocks = rows.reshape(-1, fmt.block_size)  # (n_blocks, block_size)
    packed = torch.empty((blocks.shape[0], fmt.type_size), dtype=torch.uint8)  # (n_blocks, type_size)
    step = max(1, _QUANT_CHUNK_VALUES // fmt.block_size)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step].contiguous()
        packed[start : start + step] = fmt.quantize_blocks(chunk)
    return packed.view(rows.shape[0], row_nbytes(fmt.qtype, cols))


__all__ = [
    "dequantize",
    "quantize",
    "quant_type_name",
    "row_nbytes",
    "tensor_nbytes",
]
