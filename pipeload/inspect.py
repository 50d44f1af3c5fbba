"""`pipeload inspect`: what a model file holds, layer group by layer group."""

from __future__ import annotations

import math
import os

from .runtime.engine import model_args
from .runtime.memory import format_bytes
from .weights.checkpoint import open_checkpoint
from .weights.index import WeightsIndex, build_index


def parameter_count(index: WeightsIndex) -> int:
    """Parameters in the file (a tied output matrix counted once)."""
    seen = {(t.info.path, t.info.offset): math.prod(t.info.shape) for g in index.groups.values() for t in g.tensors}
    return sum(seen.values())


def describe(path: str | os.PathLike) -> str:
    """A readable report: architecture, parameter count, settings, and per-layer bytes and types."""
    ckpt = open_checkpoint(path)
    arch, args = model_args(ckpt)
    index = build_index(ckpt, args.n_layers, getattr(arch, "HF_NAME_RULES", None), args.tie_embeddings)
    has_tokenizer = (any(k.startswith("tokenizer.ggml.") for k in ckpt.config) if ckpt.format == "gguf"
                     else (ckpt.path / "tokenizer.json").is_file() or (ckpt.path / "tokenizer.model").is_file())
    n_params = parameter_count(index)
    lines = [
        f"model:         {ckpt.path}",
        f"format:        {ckpt.format.upper()}" + (f" v{ckpt.gguf.version}" if ckpt.gguf else ""),
        f"architecture:  {ckpt.architecture} (pipeload module: {arch.__name__.rsplit('.', 1)[-1]})",
        f"parameters:    {n_params:,} ({n_params / 1e9:.3f} B)",
        f"weights:       {format_bytes(index.total_bytes)}",
        f"layers:        {args.n_layers}, hidden {args.dim}, heads {args.n_heads} (kv {args.n_kv_heads}), "
        f"head dim {args.head_dim}, ffn {args.ffn_dim}",
        f"vocabulary:    {args.vocab_size}; context {args.context_length}; tied output: {args.tie_embeddings}",
        f"tokenizer:     {'yes' if has_tokenizer else 'none'}",
        "",
        f"{'group':<10} {'tensors':>7} {'bytes':>12} {'contiguous':>10}  types",
    ]
    for g in index.groups.values():
        span = "yes" if g.byte_span else "no"
        lines.append(f"{g.name:<10} {len(g.tensors):>7} {format_bytes(g.nbytes):>12} {span:>10}  {', '.join(g.dtypes)}")
    return "\n".join(lines)
