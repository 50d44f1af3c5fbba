"""Llama family: Llama 2 and 3, Mistral, Qwen2 (q/k/v biases), Qwen3 (RMSNorm of q and k per head,
no biases). Reads top to bottom:
args -> block -> model -> checkpoint names.

Grouped-query attention, RMSNorm, SwiGLU feed-forward, rotary embeddings (neox layout for
Hugging Face checkpoints and GGUF qwen2; interleaved for GGUF llama, whose q/k rows llama.cpp's
converter permuted), llama3 / linear rope scaling or a GGUF `rope_freqs` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .common import (AttentionConfig, Embedding, Fused, LayerKV, Linear, RMSNorm, RopeConfig, StepInputs,
                     add_qk_norms, cached_attention, rope_cis, rope_inv_freq, rope_qkv, rope_tables)


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope: RopeConfig
    context_length: int
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    qk_norm: str | None = None  # "head" for Qwen3 (q/k RMSNorm per head)
    variant: str = "llama"  # "llama", "mistral", "qwen2" or "qwen3": decides the GGUF architecture when exporting

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or dim // n_heads
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5
        legacy = cfg.get("rope_scaling") or {}   # transformers 4
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling_cfg = rope if rope.get("rope_type", "default") != "default" else legacy
        kind = scaling_cfg.get("rope_type", scaling_cfg.get("type", "default")) if scaling_cfg else "default"
        if kind == "default":
            scaling = None
        elif kind == "linear":
            scaling = ("linear", float(scaling_cfg["factor"]))
        elif kind == "llama3":
            scaling = ("llama3", float(scaling_cfg["factor"]), float(scaling_cfg["low_freq_factor"]),
                       float(scaling_cfg["high_freq_factor"]), int(scaling_cfg["original_max_position_embeddings"]))
        else:
            raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")
        rot = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            ffn_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=RopeConfig(dim=rot, theta=float(theta), style="neox", scaling=scaling),
            context_length=cfg.get("max_position_embeddings", 2048),
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensor_names,
            out_bias="model.layers.0.self_attn.o_proj.bias" in tensor_names,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in tensor_names,
            tie_embeddings="lm_head.weight" not in tensor_names,
            sliding_window=window, variant=cfg.get("model_type", "llama"),
            qk_norm="head" if "model.layers.0.self_attn.q_norm.weight" in tensor_names else None,
        )

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        def key(name, default=None):
            return meta.get(f"{arch}.{name}", default)

        def required(name):
            return meta[f"{arch}.{name}"]

        dim, n_heads = required("embedding_length"), required("attention.head_count")
        head_dim = key("attention.key_length") or dim // n_heads
        scaling = None
        kind = key("rope.scaling.type", "none")
        if kind == "linear":
            scaling = ("linear", float(key("rope.scaling.factor")))
        elif kind not in ("none", None) and "rope_freqs.weight" not in shapes:
            raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (linear and llama3 are)")
        return cls(
            vocab_size=shapes["token_embd.weight"][0], dim=dim, n_layers=required("block_count"), n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv") or n_heads, head_dim=head_dim,
            ffn_dim=required("feed_forward_length"), norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
            rope=RopeConfig(dim=key("rope.dimension_count") or head_dim, theta=float(key("rope.freq_base", 10000.0)),
                            style="interleaved" if arch == "llama" else "neox", scaling=scaling),
            context_length=key("context_length", 2048),
            qkv_bias="blk.0.attn_q.bias" in shapes, out_bias="blk.0.attn_output.bias" in shapes,
            mlp_bias="blk.0.ffn_up.bias" in shapes, tie_embeddings="output.weight" not in shapes,
            variant=arch, qk_norm="head" if "blk.0.attn_q_norm.weight" in shapes else None,
        )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + swiglu(norm(x)).

    q/k/v run as one fused pass over their three weights, gate/up as another (whatever their
    storage types: Q4_K_M keeps some attn_v in Q6_K)."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.args = args
        d, hd = args.dim, args.head_dim
        self.attn_norm = RMSNorm(d, args.norm_eps)
        self.attn_q = Linear(d, args.n_heads * hd, bias=args.qkv_bias)
        self.attn_k = Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.attn_v = Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.attn_output = Linear(args.n_heads * hd, d, bias=args.out_bias)
        self.ffn_norm = RMSNorm(d, args.norm_eps)
        self.ffn_gate = Linear(d, args.ffn_dim, bias=args.mlp_bias)
        self.ffn_up = Linear(d, args.ffn_dim, bias=args.mlp_bias)
        self.ffn_down = Linear(args.ffn_dim, d, bias=args.mlp_bias)
        add_qk_norms(self, args, args.qk_norm)
        self.qkv = Fused(self.attn_q, self.attn_k, self.attn_v)
        self.gate_up = Fused(self.ffn_gate, self.ffn_up)
        self.attn_cfg = AttentionConfig(qkv_bias=args.qkv_bias, qk_norm=args.qk_norm)

    def attention(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None,
                  kv_of_head: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rope_qkv(self, x, step, self.attn_cfg, self.args.rope.style)  # (B, H|Hkv, T, hd)
        return self.attn_output(cached_attention(q, k, v, kv, step, kv_of_head=kv_of_head))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # (B, T, F) each
        return self.ffn_down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None) -> torch.Tensor:
        h = x + self.attention(self.attn_norm(x), step, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class Model(nn.Module):
    """Embeddings and head; the executor runs the blocks in between (see runtime/executor.py)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = Embedding(args.vocab_size, args.dim)
        self.output_norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.rope_freqs: torch.Tensor | None = None  # optional GGUF tensor (rot/2,) float32
        self._inv_freq: torch.Tensor | None = None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embd(tokens)  # (B, T, D)

    def step_inputs(self, positions: torch.Tensor, mask: torch.Tensor | None) -> StepInputs:
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(self.args.rope, self.rope_freqs)
        cos, sin = rope_tables(self._inv_freq, positions)
        cis = rope_cis(cos, sin) if self.args.rope.style == "interleaved" else None
        return StepInputs(positions=positions, mask=mask, cos=cos, sin=sin, cis=cis)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.output_norm(h))  # (B, T, V)


# Hugging Face checkpoint names -> GGUF names (the names the modules above carry), as plain data:
# (regex over the checkpoint name, GGUF name or None to drop the tensor[, "transpose"])
HF_NAME_RULES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),  # Qwen3
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),  # recomputed
]


# How a block splits over tensor-parallel ranks (runtime/sharding.py), as plain data: each matrix
# by rows (its outputs) or by columns (its inputs), along query heads, key/value heads,
# feed-forward columns or vocabulary rows; everything else is replicated. A rank's block is this
# Block with its share of heads and columns, run by cluster/shard.py's ShardBlock: attn_norm ->
# attention -> all-reduce -> ffn_norm -> feed_forward -> all-reduce.
TENSOR_PARALLEL = {
    "attn_q": ("rows", "heads"), "attn_k": ("rows", "kv"), "attn_v": ("rows", "kv"),
    "attn_output": ("columns", "heads"),
    "ffn_gate": ("rows", "ffn"), "ffn_up": ("rows", "ffn"), "ffn_down": ("columns", "ffn"),
    "output": ("rows", "vocab"),
}


# ---------------------------------------------------------------------------------------------
# Export to GGUF with llama.cpp's conventions


def gguf_architecture(args: ModelArgs) -> str:
    return args.variant if args.variant in ("qwen2", "qwen3") else "llama"


def gguf_metadata(args: ModelArgs) -> dict[str, Any]:
    """GGUF key/values describing `args` under llama.cpp's names."""
    arch = gguf_architecture(args)
    meta = {
        "context_length": args.context_length, "embedding_length": args.dim, "block_count": args.n_layers,
        "feed_forward_length": args.ffn_dim, "attention.head_count": args.n_heads,
        "attention.head_count_kv": args.n_kv_heads, "attention.layer_norm_rms_epsilon": float(args.norm_eps),
        "rope.freq_base": float(args.rope.theta), "rope.dimension_count": args.rope.dim,
        "attention.key_length": args.head_dim, "attention.value_length": args.head_dim,
        "vocab_size": args.vocab_size,
    }
    if args.rope.scaling and args.rope.scaling[0] == "linear":
        meta["rope.scaling.type"] = "linear"
        meta["rope.scaling.factor"] = float(args.rope.scaling[1])
    return {f"{arch}.{k}": v for k, v in meta.items()}


def gguf_extra_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    """llama3 rope scaling travels as a `rope_freqs` tensor of per-frequency divisors."""
    if args.rope.scaling and args.rope.scaling[0] == "llama3":
        plain = rope_inv_freq(RopeConfig(dim=args.rope.dim, theta=args.rope.theta))
        return {"rope_freqs.weight": (plain / rope_inv_freq(args.rope)).float()}
    return {}


def to_gguf_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """llama.cpp's converter permutes q/k rows of GGUF "llama" files so that rope rotates adjacent
    pairs; the model then runs them with the interleaved rope style."""
    if gguf_architecture(args) != "llama" or args.rope.style == "interleaved":
        return t
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return _pair_rows(t, args.n_heads)
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return _pair_rows(t, args.n_kv_heads)
    return t


def _pair_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows of each head: (x0..x_{h/2-1}, y0..y_{h/2-1}) -> (x0, y0, x1, y1, ...)
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
