"""Synthetic mixture-of-experts models: Mixtral and Qwen3-MoE shapes with random weights, written
as GGUF the way llama.cpp lays them out (experts stacked in `ffn_{gate,up,down}_exps`, the router
`ffn_gate_inp` in F32), fast: quantized tensors are random valid blocks (bench/synth.py).

Random routers route uniformly at random: no expert is more popular than another, the worst
case for an expert cache. That needs hidden states that differ from token to token: with every
weight of one standard deviation, the layers' outputs dwarf the token's embedding and the
residual stream soon looks alike for every token (measured: 14 distinct experts of 128 per layer
over 32 sampled tokens, where uniform routing gives ~111). So the token embeddings are written
at unit scale and the layers' output projections (attention output, expert down) 20x smaller:
the stream stays led by the token, and each layer's router picks afresh for each token.

`router_skew` > 0 makes routing skewed the way real routers are (some experts much more
popular): router row e of each layer is scaled by (rank_e + 1)^-skew, ranks a random
permutation per layer. A row with a larger norm gives its expert logits of a
larger spread, so it lands in the top k more often, for any hidden state: the skew holds at
every layer without knowing what the hidden states look like. How skewed routing then really
is gets measured (`pipeload bench moe` prints the share of uses of the most used experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from ..weights.gguf_export import add_value
from .synth import random_tensor, write_random_tensors


@dataclass(frozen=True)
class MoEShape:
    arch: str                 # "mixtral" (GGUF "llama" with experts) or "qwen3moe"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    expert_ffn_dim: int
    vocab: int
    context: int = 4096


MOE_SHAPES = {
    # Qwen3-30B-A3B (48 layers in the real model: pass n_layers to size the file)
    "qwen3-30b-a3b": MoEShape("qwen3moe", 2048, 48, 32, 4, 128, 128, 8, 768, 32000, 4096),
    # Mixtral 8x7B (32 layers in the real model)
    "mixtral-8x7b": MoEShape("mixtral", 4096, 32, 32, 8, 128, 8, 2, 14336, 32000, 4096),
    # small enough for the tests
    "test-mid": MoEShape("qwen3moe", 256, 4, 4, 2, 64, 32, 4, 256, 2048, 512),
    "test-mixtral": MoEShape("mixtral", 256, 3, 4, 2, 64, 8, 2, 512, 2048, 512),
}
MIXES = {"q4_k_m": T.Q4_K, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "f16": T.F16}
EMBED_STD = 1.0         # token embeddings: the residual stream is led by the token (see above)
OUTPUT_SCALE = 0.05     # the layers' output projections, relative to the other weights
OUTPUTS = ("attn_output.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")


def tensor_plan(s: MoEShape, mix: str) -> dict[str, tuple[tuple[int, ...], T]]:
    """{name: (torch-order shape, GGML type)} in llama.cpp's writing order. Q4_K_M follows
    llama.cpp's mix, simplified: attn_v and ffn_down(_exps) in Q6_K for the first, last and
    every third layer, output Q6_K, the rest Q4_K; norms and routers F32."""
    base, L = MIXES[mix], s.n_layers

    def more_bits(i: int) -> bool:
        return mix == "q4_k_m" and (i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2)

    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    E, F, D = s.n_experts, s.expert_ffn_dim, s.dim
    out = {"token_embd.weight": ((s.vocab, D), base)}
    for i in range(L):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": ((D,), T.F32), b + "attn_q.weight": ((q, D), base),
            b + "attn_k.weight": ((kv, D), base), b + "attn_v.weight": ((kv, D), T.Q6_K if more_bits(i) else base),
            b + "attn_output.weight": ((D, q), base)})
        if s.arch == "qwen3moe":
            out[b + "attn_q_norm.weight"] = ((s.head_dim,), T.F32)
            out[b + "attn_k_norm.weight"] = ((s.head_dim,), T.F32)
        out.update({
            b + "ffn_norm.weight": ((D,), T.F32), b + "ffn_gate_inp.weight": ((E, D), T.F32),
            b + "ffn_gate_exps.weight": ((E, F, D), base), b + "ffn_up_exps.weight": ((E, F, D), base),
            b + "ffn_down_exps.weight": ((E, D, F), T.Q6_K if more_bits(i) else base)})
    out["output_norm.weight"] = ((D,), T.F32)
    out["output.weight"] = ((s.vocab, D), T.Q6_K if mix == "q4_k_m" else base)
    return out


def file_bytes(s: MoEShape, mix: str) -> int:
    """Tensor bytes of the file (the header adds a few KB)."""
    return sum(int(np.prod(shp)) // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1]
               for shp, t in tensor_plan(s, mix).values())


def _router(rng: np.random.Generator, s: MoEShape, std: float, skew: float) -> np.ndarray:
    w = rng.standard_normal((s.n_experts, s.dim), np.float32) * std  # (E, D)
    if skew > 0:
        ranks = rng.permutation(s.n_experts)
        w *= ((ranks + 1.0) ** -skew).astype(np.float32)[:, None]
    return w


def write_moe_gguf(path: str | os.PathLike, s: MoEShape, mix: str = "q4_k_m", seed: int = 0, std: float = 0.02,
                   router_skew: float = 0.0, progress=None) -> Path:
    """Write a GGUF of shape `s` with random weights (llama.cpp reads it); returns its path
    (written atomically: a `.partial` file renamed at the end). Raises ValueError for an
    unknown mix or architecture."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    if s.arch not in ("mixtral", "qwen3moe"):
        raise ValueError(f"arch must be 'mixtral' or 'qwen3moe', got {s.arch!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = tensor_plan(s, mix)
    arch = "llama" if s.arch == "mixtral" else "qwen3moe"
    w = GGUFWriter(None, arch)
    w.add_name(f"synthetic-{s.arch}-{s.dim}x{s.n_layers}-{s.n_experts}e-{mix}")
    meta = {"context_length": s.context, "embedding_length": s.dim, "block_count": s.n_layers,
            "feed_forward_length": s.expert_ffn_dim, "attention.head_count": s.n_heads,
            "attention.head_count_kv": s.n_kv_heads, "attention.layer_norm_rms_epsilon": 1e-6,
            "rope.freq_base": 1000000.0, "expert_count": s.n_experts, "expert_used_count": s.top_k}
    if arch == "llama":
        meta["rope.dimension_count"] = s.head_dim
    else:
        meta.update({"attention.key_length": s.head_dim, "attention.value_length": s.head_dim,
                     "expert_feed_forward_length": s.expert_ffn_dim})
    for k, v in meta.items():
        add_value(w, f"{arch}.{k}", v)
    add_value(w, f"{arch}.vocab_size", s.vocab)  # without a tokenizer, llama.cpp sizes its vocabulary from this
    add_value(w, "tokenizer.ggml.model", "none")
    def make(name, shp, qt):
        if name.endswith("ffn_gate_inp.weight"):
            return _router(rng, s, std, router_skew)
        scale = EMBED_STD / std if name == "token_embd.weight" else OUTPUT_SCALE if name.endswith(OUTPUTS) else 1.0
        return random_tensor(rng, qt, shp, std * scale)  # a stack of experts at once: a few hundred MB at most

    return write_random_tensors(w, path, plan, make, progress)
