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


def supported() -> str:
    """`pipeload models`: the architectures pipeload runs (the names checkpoints give them, what
    each can do) and the tensor types it computes on (which with compiled kernels here)."""
    from .models import ENCODERS, GGUF_ARCHITECTURES, GGUF_VARIANTS, HF_MODEL_TYPES, _load
    from .quant import kernels
    from .quant.ops import _compiled
    from .quant.registry import quant_type_name, supported_qtypes

    modules = sorted(set(HF_MODEL_TYPES.values()) | set(GGUF_ARCHITECTURES.values())
                     | {variant for _, variant in GGUF_VARIANTS.values()})
    lines = [f"{'module':<9} {'kind':<19} {'cluster':<17}  names (HF model_type; GGUF general.architecture)"]
    for name in modules:
        module = _load(name)
        hf = sorted(k for k, v in HF_MODEL_TYPES.items() if v == name)
        gg = sorted(k for k, v in GGUF_ARCHITECTURES.items() if v == name)
        gg += [f"{arch} with {key}" for arch, (key, variant) in GGUF_VARIANTS.items() if variant == name]
        kind = ("encoder" if name in ENCODERS else
                "mixture of experts" if getattr(module, "MIXTURE_OF_EXPERTS", False) else "decoder")
        cluster = ("no" if name in ENCODERS else "pipeline, tensor" if getattr(module, "TENSOR_PARALLEL", None)
                   else "pipeline")
        lines.append(f"{name:<9} {kind:<19} {cluster:<17}  {', '.join(hf) or '-'}; {', '.join(gg) or '-'}")
    lib = kernels.library()
    fast = [quant_type_name(q) for q in supported_qtypes() if lib is not None and _compiled(lib, q)]
    slow = [quant_type_name(q) for q in supported_qtypes() if lib is None or not _compiled(lib, q)]
    lines += ["", f"tensor types with compiled kernels ({kernels.backend()}): {', '.join(fast) or 'none'}",
              f"tensor types computed through torch: {', '.join(slow) or 'none'}",
              "every architecture streams under a memory_limit and serves; decoders batch and run speculative "
              "decoding; encoders embed and classify"]
    return "\n".join(lines)
