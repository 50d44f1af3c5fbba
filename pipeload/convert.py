"""`pipeload convert`: write a GGUF file (llama.cpp's conventions) from an HF folder or a GGUF file.

Works one layer group at a time, so converting never holds more than one layer in memory.
Tensors are written grouped by layer (embeddings, blk.0, blk.1, ..., head) so that each streamed
layer is one contiguous byte range. The file appears under its name only when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from .errors import UnsupportedModelError
from .quant.mixes import FILE_TYPES, MIXES, UNIFORM, tensor_type
from .runtime.memory import peak_rss
from .runtime.spec import open_model
from .weights.decode import read_decoded
from .weights.gguf_export import add_value, hf_tokenizer_metadata
from .weights.io import RangeReader

QUANT_TYPES = {**UNIFORM, **{m: m.upper() for m in MIXES}}  # --quant names (uniform types and mixes)


@dataclass
class ConvertReport:
    path: Path
    tensors: int
    bytes_written: int
    peak_rss: int


class GroupEncoder(Protocol):
    """Turns one layer group's float tensors into the bytes to store (a calibrated quantizer is one)."""

    def encode_group(self, group: str, tensors: dict[str, torch.Tensor],
                     types: dict[str, str]) -> dict[str, np.ndarray]:
        """{name: stored bytes or float array} for `tensors` (source layout, float32) stored as `types`."""
        ...


class RoundToNearest:
    """The plain quantizers: every tensor on its own, round to nearest (llama.cpp's reference)."""

    def encode_group(self, group: str, tensors: dict[str, torch.Tensor],
                     types: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: encode_tensor(t, types[name]) for name, t in tensors.items()}


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
            progress: Callable[[int, int], None] | None = None, encoder: GroupEncoder | None = None,
            types: Callable[[str, tuple[int, ...]], str] | None = None) -> ConvertReport:
    """Write `src` as a GGUF file at `out` with weights stored as `quant` (a uniform type or a
    llama.cpp mix such as q4_k_m); returns what was written.

    `encoder` turns each layer group into bytes (default: round to nearest, tensor by tensor);
    `types(name, shape)` overrides the GGML type names `quant` implies. Raises
    UnsupportedModelError for an unknown quant."""
    if quant not in QUANT_TYPES:
        raise UnsupportedModelError(f"unknown --quant {quant!r}; choose from {', '.join(QUANT_TYPES)}")
    encoder = encoder or RoundToNearest()
    out = Path(out)
    spec = open_model(src)
    ckpt, arch, args, index = spec.checkpoint, spec.arch, spec.args, spec.index
    write_tied = getattr(arch, "GGUF_WRITES_TIED_OUTPUT", False)
    has_output = not args.tie_embeddings or write_tied
    if types is None:
        def types(name: str, shape: tuple[int, ...]) -> str:
            return tensor_type(name, shape, quant, args.n_layers, has_output)

    if not hasattr(arch, "gguf_architecture"):
        raise UnsupportedModelError(f"{src}: pipeload convert does not write the {ckpt.architecture} architecture; "
                                    f"llama.cpp's convert_hf_to_gguf.py does")
    w = GGUFWriter(None, arch.gguf_architecture(args))
    w.add_name(out.stem)
    w.add_file_type(FILE_TYPES[quant])
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
            plan.append((ref.name, ref.shape, types(ref.name, ref.shape)))
        if group.name == "embed":
            plan.extend((name, tuple(t.shape), "F32") for name, t in extra.items())
    planned = {name: gtype for name, _, gtype in plan}
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
                tensors = read_decoded([group], reader, torch.float32)
                if group.name == "embed":
                    tensors.update(extra)
                names = [n for n, _, _ in plan if n in tensors]
                encoded = encoder.encode_group(group.name, {n: tensors[n] for n in names},
                                               {n: planned[n] for n in names})
                del tensors
                for name in names:
                    expect_name, _, gtype = next(todo)
                    assert expect_name == name, (expect_name, name)
                    # rows are quantized independently, so llama.cpp's q/k row order is applied to the bytes
                    stored = arch.to_gguf_tensor(name, torch.from_numpy(np.ascontiguousarray(encoded[name])), args)
                    data = stored.contiguous().numpy()
                    w.write_tensor_data(data)
                    written += data.nbytes
                    if progress:
                        progress(written, total)
                del encoded
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return ConvertReport(path=out, tensors=len(plan), bytes_written=written, peak_rss=peak_rss())
