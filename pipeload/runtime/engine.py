"""Loading a checkpoint into something that computes logits: architecture, weights index, executor."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import models
from ..errors import ModelFileError
from ..weights.checkpoint import Checkpoint, open_checkpoint
from ..weights.index import WeightsIndex, build_index
from ..weights.io import RangeReader
from .executor import Executor, ResidentLayers
from .kv_cache import KVCache
from .loader import attach_weights, decode_tensor, read_raw


@dataclass
class Engine:
    """A loaded model: what it is (args), where its bytes are (index), and how to run it."""

    checkpoint: Checkpoint
    arch: ModuleType
    args: Any
    index: WeightsIndex
    model: nn.Module
    executor: Executor
    dtype: torch.dtype

    @property
    def context_length(self) -> int:
        return self.args.context_length

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, max_len, self.dtype)


def model_args(ckpt: Checkpoint) -> tuple[ModuleType, Any]:
    """(architecture module, ModelArgs) from a checkpoint's metadata; raises on missing keys."""
    try:
        if ckpt.format == "gguf":
            arch = models.for_gguf_architecture(ckpt.architecture)
            shapes = {name: t.shape for name, t in ckpt.tensors.items()}
            args = arch.ModelArgs.from_gguf(ckpt.architecture, ckpt.config, shapes)
        else:
            arch = models.for_hf_model_type(ckpt.architecture)
            args = arch.ModelArgs.from_hf_config(ckpt.config, set(ckpt.tensors))
    except KeyError as e:
        where = "GGUF metadata" if ckpt.format == "gguf" else "config.json"
        raise ModelFileError(f"{ckpt.path}: {where} lacks {e.args[0]!r}") from None
    except (TypeError, ZeroDivisionError) as e:
        where = "GGUF metadata" if ckpt.format == "gguf" else "config.json"
        raise ModelFileError(f"{ckpt.path}: {where} has a missing or malformed setting ({e})") from None
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.type in ("int", int) and (not isinstance(value, int) or value <= 0):
            raise ModelFileError(f"{ckpt.path}: model setting {field.name} = {value!r} is missing or not a positive integer")
    return arch, args


def resolve_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> tuple[torch.dtype, bool]:
    """(compute dtype, native kernels?) — by default float32 when every weight matrix is stored
    F32 (the exact path), else bfloat16 with kernel-native packed weights."""
    if dtype is None:
        all_f32 = all(t.dtype in ("F32", "F64") for t in ckpt.tensors.values() if len(t.shape) >= 2)
        dtype = torch.float32 if all_f32 else torch.bfloat16
    return dtype, dtype == torch.bfloat16


def load_engine(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Engine:
    """Open a GGUF file or HF folder and load every layer resident; raises PipeloadError subclasses.

    dtype None picks float32 for all-F32 files, else bfloat16 with quantized matrices kept packed."""
    ckpt = open_checkpoint(path)
    arch, args = model_args(ckpt)
    dtype, native = resolve_dtype(ckpt, dtype)
    index = build_index(ckpt, args.n_layers, getattr(arch, "HF_NAME_RULES", None), args.tie_embeddings)
    model = arch.Model(args)
    with RangeReader() as reader:
        outer = read_raw([index.groups["embed"], index.groups["head"]], reader)
        rope_freqs = outer.pop("rope_freqs.weight", None)
        if rope_freqs is not None:
            model.rope_freqs = decode_tensor(*rope_freqs, torch.float32)
        attach_weights(model, outer, "", dtype, native, f"{ckpt.path}: embeddings and head")
        blocks = []
        for i in range(args.n_layers):
            block = model.new_block(i)
            attach_weights(block, read_raw([index.block(i)], reader), f"blk.{i}.", dtype, native,
                           f"{ckpt.path}: layer {i}")
            blocks.append(block)
    executor = Executor(model, ResidentLayers(blocks), args.n_layers, args.sliding_window)
    return Engine(checkpoint=ckpt, arch=arch, args=args, index=index, model=model, executor=executor, dtype=dtype)
