"""`pipeload convert`: write a GGUF file (llama.cpp's conventions) from an HF folder or a GGUF file.

Works one layer group at a time, so converting never holds more than one layer in memory.
Tensors are written grouped by layer (embeddings, blk.0, blk.1, ..., head) so that each streamed
layer is one contiguous byte range. The file appears under its name only when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from .errors import UnsupportedModelError
from .runtime.engine import model_args
from .runtime.loader import read_group
from .runtime.memory import peak_rss
from .weights.checkpoint import open_checkpoint
from .weights.gguf_export import add_value, hf_tokenizer_metadata
from .weights.index import build_index
from .weights.io import RangeReader

# --quant name -> GGML type for 2-D weight matrices (norms, biases and other 1-D tensors stay F32)
QUANT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
# llama.cpp's general.file_type numbers (LLAMA_FTYPE_*)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q5_K": 17,
              "Q6_K": 18, "BF16": 32}


@dataclass
class ConvertReport:
    path: Path
    tensors: int
    bytes_written: int
    peak_rss: int


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> str:
    """GGML type to store a tensor in: the chosen quant for 2-D weights whose rows fit its blocks."""
    from .quant import row_nbytes

    if len(shape) < 2 or not name.endswith(".weight") or quant == "F32":
        return "F32"
    try:
        row_nbytes(GGMLQuantizationType[quant], shape[-1])
    except ValueError:
        return "F16"  # llama.cpp's fallback for rows that are not a multiple of the block size
    return quant


def encode_tensor(t: torch.Tensor, ggml_type: str) -> np.ndarray:
    """The bytes of `t` stored as `ggml_type` (numpy, row-major)."""
    if ggml_type == "F32":
        return t.float().contiguous().numpy()
    if ggml_type == "F16":
        return t.to(torch.float16).contiguous().numpy()
    from .quant import quantize

    rows = t.float().reshape(-1, t.shape[-1])
    return quantize(rows, GGMLQuantizationType[ggml_type]).numpy()


def convert(src: str | os.PathLike, out: str | os.PathLike, quant: str = "f16",
            progress: Callable[[int, int], None] | None = None) -> ConvertReport:
    """Write `src` as a GGUF file at `out` with weights stored as `quant`; returns what was written."""
    if quant not in QUANT_TYPES:
        raise UnsupportedModelError(f"unknown --quant {quant!r}; choose from {', '.join(QUANT_TYPES)}")
    qtype = QUANT_TYPES[quant]
    out = Path(out)
    ckpt = open_checkpoint(src)
    arch, args = model_args(ckpt)
    index = build_index(ckpt, args.n_layers, getattr(arch, "HF_NAME_RULES", None), args.tie_embeddings)
    write_tied = getattr(arch, "GGUF_WRITES_TIED_OUTPUT", False)

    w = GGUFWriter(None, arch.gguf_architecture(args))
    w.add_name(out.stem)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(2)
    metadata = dict(arch.gguf_metadata(args))
    if ckpt.format == "hf":
        metadata.update(hf_tokenizer_metadata(ckpt.path, args.vocab_size) or {"tokenizer.ggml.model": "none"})
    else:  # carry over the source's tokenizer and template
        metadata.update({k: v for k, v in ckpt.config.items() if k.startswith("tokenizer.")})
    for key, value in metadata.items():
        add_value(w, key, value)

    extra = arch.gguf_extra_tensors(args)
    groups = [index.groups["embed"]] + [index.block(i) for i in range(args.n_layers)] + [index.groups["head"]]
    plan: list[tuple[str, tuple[int, ...], str]] = []  # (name, shape, ggml type) in writing order
    for group in groups:
        for ref in group.tensors:
            if ref.name in extra:
                continue
            if ref.name == "output.weight" and args.tie_embeddings and not write_tied:
                continue
            plan.append((ref.name, ref.shape, tensor_type(ref.name, ref.shape, qtype)))
        if group.name == "embed":
            plan.extend((name, tuple(t.shape), "F32") for name, t in extra.items())
    from .quant import tensor_nbytes

    for name, shape, gtype in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), tensor_nbytes(GGMLQuantizationType[gtype], shape),
                          raw_dtype=GGMLQuantizationType[gtype])

    tmp = out.with_name(out.name + ".partial")
    written = 0
    total = sum(tensor_nbytes(GGMLQuantizationType[g], s) for _, s, g in plan)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        todo = iter(plan)
        with RangeReader() as reader:
            for group in groups:
                tensors = read_group([group], reader, torch.float32)
                if group.name == "embed":
                    tensors.update(extra)
                for name in [n for n, _, _ in plan if n in tensors]:
                    expect_name, _, gtype = next(todo)
                    assert expect_name == name, (expect_name, name)
                    data = encode_tensor(arch.to_gguf_tensor(name, tensors[name], args), gtype)
                    w.write_tensor_data(data)
                    written += data.nbytes
                    if progress:
                        progress(written, total)
                del tensors
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return ConvertReport(path=out, tensors=len(plan), bytes_written=written, peak_rss=peak_rss())
