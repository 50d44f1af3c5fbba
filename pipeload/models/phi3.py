"""Phi-3 (and Phi-3.5, Phi-4 mini): the llama block with q/k/v stored as one matrix (attn_qkv) and
gate/up as one (ffn_up, gate rows first), and su/longrope rope scaling. args -> block -> model -> names.

LongRoPE divides each rotary frequency by a per-frequency factor, the short factors while the
sequence is within `original_max_position_embeddings`, the long ones beyond it, and scales cos
and sin by an attention factor. Like transformers, a step picks the set by its largest position
(llama.cpp picks once, by the context size the session was created with). Hugging Face configs
carry the factors as lists; llama.cpp's converter writes them as tensors (rope_factors_long /
rope_factors_short) with the attention factor and original context in the metadata.

A `sliding_window` in the config applies to every layer, as in transformers (llama.cpp's phi3
graph disables it: see its warning "Phi SWA is currently disabled").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import llama
from .common import (AttentionConfig, Embedding, Linear, RMSNorm, RopeConfig, Split, StepInputs, rope_inv_freq,
                     rope_tables)

EMBED_NAMES = ("token_embd", "rope_factors_long", "rope_factors_short")


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    """llama's args; rope.scaling is None or ("longrope", short factors | None, long factors | None,
    original context, attention factor) (factors None: the GGUF's rope_factors_* tensors)."""

    variant: str = "phi3"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        plain = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
        plain["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        plain["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        base = llama.ModelArgs.from_hf_config(plain, _as_llama_names(tensor_names))
        scaling = None
        if kind in ("su", "longrope"):
            orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
            if orig is None:
                raise KeyError("original_max_position_embeddings")
            factor = rope.get("factor") or cfg["max_position_embeddings"] / orig
            attn = rope.get("attention_factor")
            if attn is None:
                attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            scaling = ("longrope", tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"])),
                       int(orig), float(attn))
        elif kind != "default":
            raise UnsupportedModelError(f"Phi-3 rope scaling type {kind!r} is not supported (default, longrope/su are)")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.ModelArgs)}
        fields.update(rope=dataclasses.replace(base.rope, scaling=scaling), variant="phi3",
                      sliding_window=cfg.get("sliding_window") or None)
        return cls(**fields)

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        plain = {k: v for k, v in meta.items() if not k.startswith(f"{arch}.rope.scaling.")}
        base = llama.ModelArgs.from_gguf(arch, plain, {**{n: () for n in _as_llama_names(set(shapes))}, **shapes})
        scaling = None
        if "rope_factors_long.weight" in shapes or "rope_factors_short.weight" in shapes:
            for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
                if shapes.get(name) != (base.rope.dim // 2,):
                    raise UnsupportedModelError(f"tensor {name!r} has shape {list(shapes.get(name, ()))}, "
                                                f"LongRoPE needs {[base.rope.dim // 2]}")
            scaling = ("longrope", None, None, int(meta[f"{arch}.rope.scaling.original_context_length"]),
                       float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)))
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.ModelArgs)}
        fields.update(rope=dataclasses.replace(base.rope, scaling=scaling), variant="phi3",
                      sliding_window=meta.get(f"{arch}.attention.sliding_window") or None)
        return cls(**fields)


def _as_llama_names(names: set[str]) -> set[str]:
    """The fused names as llama's argument readers look for them (biases and tied output)."""
    return names | {n.replace("qkv_proj", "q_proj").replace("attn_qkv", "attn_q") for n in names}


class Block(llama.Block):
    """llama's block (pre-norm attention and SwiGLU) over Phi-3's fused matrices: attn_qkv's rows
    are q, k, v; ffn_up's are gate then up. Each is one linear pass, split after."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        nn.Module.__init__(self)
        self.args = args
        d, hd, q, kv = args.dim, args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.attn_norm = RMSNorm(d, args.norm_eps)
        self.attn_qkv = Linear(d, q + 2 * kv, bias=args.qkv_bias)
        self.attn_output = Linear(q, d, bias=args.out_bias)
        self.ffn_norm = RMSNorm(d, args.norm_eps)
        self.ffn_up = Linear(d, 2 * args.ffn_dim, bias=args.mlp_bias)
        self.ffn_down = Linear(args.ffn_dim, d, bias=args.mlp_bias)
        self.qkv = Split(self.attn_qkv, [q, kv, kv])
        self.gate_up = Split(self.ffn_up, [args.ffn_dim, args.ffn_dim])
        self.attn_cfg = AttentionConfig(qkv_bias=args.qkv_bias)


class Model(llama.Model):
    """llama's embeddings and head; rope tables with LongRoPE factors and attention factor."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.token_embd = Embedding(args.vocab_size, args.dim)
        self.output_norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.rope_factors_long: torch.Tensor | None = None   # GGUF tensors (rot/2,) float32
        self.rope_factors_short: torch.Tensor | None = None
        self._inv_freq: dict[bool, torch.Tensor] = {}

    def inv_freq(self, long: bool) -> torch.Tensor:
        """(rot/2,) float32: the plain frequencies over the short or long factors (if any)."""
        if long not in self._inv_freq:
            rope = self.args.rope
            plain = rope_inv_freq(RopeConfig(dim=rope.dim, theta=rope.theta))
            if rope.scaling is None:
                self._inv_freq[long] = plain
            else:
                _, short, long_, _, _ = rope.scaling
                given = self.rope_factors_long if long else self.rope_factors_short
                factors = given if given is not None else torch.tensor(long_ if long else short, dtype=torch.float32)
                self._inv_freq[long] = plain / factors.float()
        return self._inv_freq[long]

    def step_inputs(self, positions: torch.Tensor, mask: torch.Tensor | None) -> StepInputs:
        scaling = self.args.rope.scaling
        long = scaling is not None and int(positions.max()) + 1 > scaling[3]
        cos, sin = rope_tables(self.inv_freq(long), positions)  # (B, 1, T, rot/2)
        if scaling is not None and scaling[4] != 1.0:
            cos, sin = cos * scaling[4], sin * scaling[4]
        return StepInputs(positions=positions, mask=mask, cos=cos, sin=sin)


# Hugging Face names -> GGUF names (see llama.py)
HF_NAME_RULES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.(?:inv_freq|long_inv_freq|short_inv_freq)", None),
]

# No tensor-parallel split: attn_qkv stacks q and k/v parts of different sizes (grouped-query
# heads), which runtime/sharding.py's equal-part row splits do not cut. Pipeline parallel works.
TENSOR_PARALLEL = None
TENSOR_PARALLEL_NOTE = "attn_qkv stacks q and k/v parts of different sizes, which the row splits do not cut"


# ---------------------------------------------------------------------------------------------
# Export to GGUF with llama.cpp's conventions (its converter's phi3 keys and rope tensors)


def gguf_architecture(args: ModelArgs) -> str:
    return "phi3"


def gguf_metadata(args: ModelArgs) -> dict[str, Any]:
    """llama's keys under "phi3.", LongRoPE's original context and attention factor, the window (0: none)."""
    meta = {f"phi3.{k.split('.', 1)[1]}": v for k, v in llama.gguf_metadata(args).items()}
    meta["phi3.attention.sliding_window"] = args.sliding_window or 0
    if args.rope.scaling is not None:
        meta["phi3.rope.scaling.original_context_length"] = args.rope.scaling[3]
        meta["phi3.rope.scaling.attn_factor"] = float(args.rope.scaling[4])
    return meta


def gguf_extra_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    """LongRoPE's factors as llama.cpp's tensors (none when they came as tensors: they are copied)."""
    if args.rope.scaling is None or args.rope.scaling[1] is None:
        return {}
    _, short, long_, _, _ = args.rope.scaling
    return {"rope_factors_long.weight": torch.tensor(long_, dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(short, dtype=torch.float32)}


def to_gguf_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    return t
