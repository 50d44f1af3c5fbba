"""The kernel-native cache: streamable layer groups stored in the layout the kernels eat.

Streaming pays off only if a layer is usable as soon as its bytes land: no dequantizing, no
repacking per token. So each streamable group ("blk.0" ... "blk.N-1", "head") is converted once
(GGUF/HF -> packed int4/int8/bf16 modules, quant/native.py), and its tensors are written back to
back into one 4096-aligned span of `layers.bin`. `layout.json`, written last, says for every group
its span, its tensors (offset, dtype, shape) and which modules are packed linears. A streamed
layer is then one O_DIRECT read into a reused buffer plus views into it.

The cache lives beside the model (`<model>.pipeload-native/<key>/`), or under
~/.cache/pipeload when the model's folder is read-only, and is rebuilt when the source file's size
or modification time, the compute dtype or the format version change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..quant.linear import Int4Linear, Int8Linear, Linear
from ..weights.io import ALIGN, RangeReader
from .loader import attach_weights, read_raw

FORMAT_VERSION = 1
TENSOR_ALIGN = 64
PACKED_CLASSES = {"Int4Linear": Int4Linear, "Int8Linear": Int8Linear, "Linear": Linear}
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32)}


@dataclass
class TensorSlot:
    name: str          # relative to the group's module ("attn_q.qweight", "output.weight")
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int        # within the group's span
    nbytes: int
    is_buffer: bool


@dataclass
class GroupLayout:
    name: str                     # "blk.3" or "head"
    offset: int                   # of the span in layers.bin (4096-aligned)
    nbytes: int                   # span length (4096-aligned)
    tensors: list[TensorSlot]
    modules: dict[str, list]      # sub-module name -> [class name, in_features, out_features, group/None, bias]


@dataclass
class NativeCache:
    folder: Path
    groups: dict[str, GroupLayout]

    @property
    def data_path(self) -> Path:
        return self.folder / "layers.bin"

    @property
    def max_span(self) -> int:
        return max(g.nbytes for g in self.groups.values())


def cache_key(source: Path, dtype: torch.dtype) -> str:
    st = source.stat() if source.is_file() else max((p.stat() for p in source.iterdir()), key=lambda s: s.st_mtime_ns)
    size = source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.iterdir())
    ident = f"{source.resolve()}|{size}|{st.st_mtime_ns}|{dtype}|v{FORMAT_VERSION}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def cache_folder(source: Path, dtype: torch.dtype, root: Path | None = None) -> Path:
    """Where the cache of `source` lives: beside it if writable, else under ~/.cache/pipeload."""
    key = cache_key(source, dtype)
    if root is not None:
        return root / f"{source.name}.pipeload-native" / key
    beside = source.parent / f"{source.name}.pipeload-native"
    if os.access(source.parent, os.W_OK):
        return beside / key
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeload" / f"{source.name}-native" / key


def _describe_modules(module: nn.Module) -> dict[str, list]:
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (Int4Linear, Int8Linear)) or (isinstance(sub, Linear) and name):
            group = getattr(sub, "group_size", None)
            out[name] = [type(sub).__name__, sub.in_features, sub.out_features, group, sub.bias is not None]
    return out


def _tensors_of(module: nn.Module, only: tuple[str, ...] | None) -> list[tuple[str, torch.Tensor, bool]]:
    items = [(n, t, False) for n, t in module.named_parameters()] + [(n, t, True) for n, t in module.named_buffers()]
    return [(n, t, b) for n, t, b in items if t is not None and (only is None or n.startswith(only))]


def build_native_cache(engine_parts, folder: Path, dtype: torch.dtype, native: bool,
                       progress: Callable[[int, int], None] | None = None) -> NativeCache:
    """Convert every block and the head once and write them layer-contiguous into `folder`."""
    ckpt, args, index, model = engine_parts
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    groups: dict[str, GroupLayout] = {}
    offset = 0
    names = [f"blk.{i}" for i in range(args.n_layers)] + ["head"]
    with RangeReader() as reader, open(tmp / "layers.bin", "wb") as out:
        for done, name in enumerate(names):
            if name == "head":
                module = type(model)(args)  # a fresh skeleton whose head we fill
                raw = read_raw([index.groups["head"]], reader)
                attach_weights(module, raw, "", dtype, native, f"{ckpt.path}: head", only=("output",))
                tensors = _tensors_of(module, ("output_norm.", "output."))
            else:
                i = int(name.split(".")[1])
                module = model.new_block(i)
                attach_weights(module, read_raw([index.groups[name]], reader), f"{name}.", dtype, native,
                               f"{ckpt.path}: layer {i}")
                tensors = _tensors_of(module, None)
            slots, pos = [], 0
            for tname, t, is_buffer in tensors:
                pos = -(-pos // TENSOR_ALIGN) * TENSOR_ALIGN
                data = t.detach().contiguous().view(-1).view(torch.uint8)
                out.seek(offset + pos)
                out.write(memoryview(data.numpy()))
                slots.append(TensorSlot(tname, t.dtype, tuple(t.shape), pos, data.numel(), is_buffer))
                pos += data.numel()
            span = -(-pos // ALIGN) * ALIGN
            groups[name] = GroupLayout(name, offset, span, slots, _describe_modules(module))
            offset += span
            if progress:
                progress(done + 1, len(names))
        out.truncate(offset)
        out.flush()
        os.fsync(out.fileno())  # then drop it from the page cache: the cache file is read cold, for real
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    layout = {"format_version": FORMAT_VERSION, "source": str(ckpt.path), "dtype": str(dtype), "groups": [
        {"name": g.name, "offset": g.offset, "nbytes": g.nbytes, "modules": g.modules,
         "tensors": [[s.name, str(s.dtype), list(s.shape), s.offset, s.nbytes, s.is_buffer] for s in g.tensors]}
        for g in groups.values()]}
    (tmp / "layout.json").write_text(json.dumps(layout))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return NativeCache(folder, groups)


def open_native_cache(folder: Path) -> NativeCache | None:
    """The cache in `folder`, or None if there is none (or an incomplete one)."""
    path = folder / "layout.json"
    if not path.is_file() or not (folder / "layers.bin").is_file():
        return None
    layout = json.loads(path.read_text())
    if layout.get("format_version") != FORMAT_VERSION:
        return None
    groups = {}
    for g in layout["groups"]:
        slots = [TensorSlot(n, DTYPES[d], tuple(s), o, nb, b) for n, d, s, o, nb, b in g["tensors"]]
        groups[g["name"]] = GroupLayout(g["name"], g["offset"], g["nbytes"], slots, g["modules"])
    return NativeCache(folder, groups)


def make_skeleton(module: nn.Module, layout: GroupLayout) -> nn.Module:
    """Swap `module`'s linears for the packed classes the layout records (weights on meta)."""
    for name, (cls_name, k, n, group, bias) in layout.modules.items():
        cls = PACKED_CLASSES[cls_name]
        new = cls(k, n, group, bias=bias) if cls is Int4Linear else cls(k, n, bias=bias)
        owner_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner_name) if owner_name else module, leaf, new)
    return module


def bind(module: nn.Module, layout: GroupLayout, span: torch.Tensor) -> None:
    """Point `module`'s tensors at views into `span` (the group's bytes); nothing is copied."""
    for s in layout.tensors:
        view = span[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        owner_name, _, leaf = s.name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if s.is_buffer:
            owner._buffers[leaf] = view
        else:
            owner._parameters[leaf] = nn.Parameter(view, requires_grad=False)
