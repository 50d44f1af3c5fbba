"""`pipeload inspect`: what a model file holds, layer group by layer group."""

from __future__ import annotations

import math
import os

from .runtime.memory import format_bytes
from .runtime.spec import open_model
from .weights.index import WeightsIndex


def parameter_count(index: WeightsIndex) -> int:
    """Parameters in the file (a tied output matrix counted once)."""
    seen = {(t.info.path, t.info.offset): math.prod(t.info.shape) for g in index.groups.values() for t in g.tensors}
    return sum(seen.values())


def describe(path: str | os.PathLike) -> str:
    """A readable report: architecture, parameter count, settings, and per-layer bytes and types."""
    spec = open_model(path)
    ckpt, arch, args, index = spec.checkpoint, spec.arch, spec.args, spec.index
    has_tokenizer = spec.tokenizer_source != "none"
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
