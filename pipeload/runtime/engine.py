"""Loading a checkpoint into something that computes logits: architecture, weights index, executor."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
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
    context: int = 0                 # positions a sequence may use (<= the model's context)
    plan: Any = None                 # runtime.planner.Plan when a memory budget was given
    io_mode: str | None = None       # "direct" or "buffered" when layers stream

    @property
    def context_length(self) -> int:
        return self.context or self.args.context_length

    @property
    def stream_stats(self):
        return getattr(self.executor.layers, "stats", None)

    def close(self) -> None:
        self.executor.layers.close()

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


def load_engine(path: str | os.PathLike, dtype: torch.dtype | None = None, memory_limit: int | None = None,
                context: int | None = None, batch: int = 1, prefetch_depth: int = 2, parallel_loading: bool = True,
                io_mode: str = "auto", cache_dir: Path | None = None, progress=None) -> Engine:
    """Open a GGUF file or HF folder and make it runnable; raises PipeloadError subclasses.

    dtype None picks float32 for all-F32 files, else bfloat16 with quantized matrices kept packed.
    With memory_limit (bytes), the planner decides which layer groups stay resident and which
    stream from the kernel-native cache (built on first use) through a prefetch ring."""
    ckpt = open_checkpoint(path)
    arch, args = model_args(ckpt)
    dtype, native = resolve_dtype(ckpt, dtype)
    context = min(context or args.context_length, args.context_length)
    index = build_index(ckpt, args.n_layers, getattr(arch, "HF_NAME_RULES", None), args.tie_embeddings)
    model = arch.Model(args)
    plan = None
    if memory_limit is not None:
        from .memory import current_rss
        from .planner import make_plan
        from .streaming import keep_torch_quiet

        keep_torch_quiet()
        plan = make_plan(index, args, dtype, memory_limit, current_rss(), context, batch, prefetch_depth)
    with RangeReader() as reader:
        outer = read_raw([index.groups["embed"], index.groups["head"]], reader)
        rope_freqs = outer.pop("rope_freqs.weight", None)
        if rope_freqs is not None:
            model.rope_freqs = decode_tensor(*rope_freqs, torch.float32)
        cached = None
        if plan is not None and not plan.streamed:
            from .native_cache import cache_folder, open_native_cache

            cached = open_native_cache(cache_folder(ckpt.path, dtype, cache_dir))
        if (plan is None or not plan.streamed) and cached is None:
            attach_weights(model, outer, "", dtype, native, f"{ckpt.path}: embeddings and head")
            blocks = []
            for i in range(args.n_layers):
                block = model.new_block(i)
                attach_weights(block, read_raw([index.block(i)], reader), f"blk.{i}.", dtype, native,
                               f"{ckpt.path}: layer {i}")
                if hasattr(block, "fuse"):
                    block.fuse()  # merged q/k/v and gate/up matrices: same outputs, fewer products
                blocks.append(block)
            layers, chosen_io = ResidentLayers(model, blocks), None
        else:
            embed = {k: v for k, v in outer.items() if not k.startswith("output")}
            attach_weights(model, embed, "", dtype, native, f"{ckpt.path}: embeddings",
                           only=("token_embd", "position_embd"))
            del outer, embed
            layers, chosen_io = _streamed_layers(ckpt, args, index, model, plan, dtype, native, io_mode,
                                                 parallel_loading, cache_dir, progress)
    executor = Executor(model, layers, args.n_layers, args.sliding_window)
    return Engine(checkpoint=ckpt, arch=arch, args=args, index=index, model=model, executor=executor, dtype=dtype,
                  context=context, plan=plan, io_mode=chosen_io)


def _streamed_layers(ckpt, args, index, model, plan, dtype, native, io_mode, parallel_loading, cache_dir, progress):
    from ..weights.io import IO_MODES, probe_read_bandwidth
    from .native_cache import build_native_cache, cache_folder, open_native_cache
    from .streaming import StreamedLayers, load_resident_from_cache

    folder = cache_folder(ckpt.path, dtype, cache_dir)
    cache = open_native_cache(folder) or build_native_cache((ckpt, args, index, model), folder, dtype, native, progress)
    if io_mode == "auto" and not plan.streamed:
        io_mode = "direct"  # only the one-time reads of resident groups
    elif io_mode == "auto":
        # the probe's buffer is at most the ring, which the plan has counted and which is not allocated yet
        speeds = probe_read_bandwidth(cache.data_path, nbytes=min(256 << 20, plan.ring_bytes))
        io_mode = max(speeds, key=speeds.get)
        plan.notes.append("read bandwidth probed: " + ", ".join(f"{m} {v / 1e9:.2f} GB/s" for m, v in speeds.items())
                          + f" -> {io_mode}")
    elif io_mode not in IO_MODES:
        raise ValueError(f"io_mode must be 'auto', 'direct' or 'buffered', got {io_mode!r}")
    resident = {}
    for group in plan.resident:
        module = model if group == "head" else model.new_block(int(group[4:]))
        resident[group] = load_resident_from_cache(cache, group, module, io_mode)
    layers = StreamedLayers(model, cache, resident, plan.streamed, plan.prefetch_depth, io_mode,
                            read_threads=2 if parallel_loading else 1)
    return layers, io_mode
