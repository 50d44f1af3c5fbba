"""Gemma 2 and Gemma 3 (text). Reads top to bottom: args -> block -> model -> checkpoint names.

Both: grouped-query attention, GeGLU feed-forward (tanh GELU of the gate times up), RMSNorm of
(1 + w) (Hugging Face files store w; llama.cpp's converter writes 1 + w into its GGUF, so the
norms take an offset of 1 from HF folders and 0 from GGUF), embeddings scaled by sqrt(dim),
norms before *and after* attention and feed-forward, sliding-window attention on the local
layers between global ones, and a query scale of query_pre_attn_scalar^-1/2.

- Gemma 2: attention scores and final logits soft-capped (cap * tanh(x / cap)); every other
  layer local (layers 0, 2, 4, ...).
- Gemma 3: RMSNorm of q and k per head, no soft-capping by default, five local layers to a
  global one, and a rope base of its own for the local layers (rope_local_base_freq / the GGUF's
  rope.freq_base_swa); linear rope scaling, where set, applies to the global layers only.

The query scale: transformers uses query_pre_attn_scalar; a GGUF does not carry it, and
llama.cpp uses head_dim, except for the 27B models (46 layers for Gemma 2, 62 for Gemma 3)
where it uses dim / n_heads — the two values those models' query_pre_attn_scalar holds. From a
GGUF this module does the same (a GGUF `attention.scale`, where present, wins).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from . import llama
from .common import (AttentionConfig, Embedding, Fused, LayerKV, Linear, RMSNorm, RopeConfig, StepInputs, add_qk_norms,
                     cached_attention, rope_inv_freq, rope_qkv, rope_tables)

# local layers per global one, counting the global: layer i is local unless (i + 1) % pattern == 0
DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6}
# llama.cpp's layer counts of the 27B models, whose query scale is (dim / n_heads)^-1/2
LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    """llama's args and: the norms' offset, the query scale, the soft caps, every layer's window
    (None: global) and the local layers' rope (None: the global one)."""

    variant: str = "gemma2"
    norm_offset: float = 0.0
    attn_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_windows: tuple = ()
    local_rope: RopeConfig | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        variant = "gemma3" if cfg["model_type"].startswith("gemma3") else "gemma2"
        params = cfg.get("rope_parameters") or {}
        by_type = params if "full_attention" in params else {"full_attention": params}

        def llama_args(rope_params):
            return llama.ModelArgs.from_hf_config({**cfg, "rope_parameters": rope_params, "use_sliding_window": False},
                                                  tensor_names)

        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise UnsupportedModelError(f"Gemma activation {act!r} is not supported (gelu_pytorch_tanh is)")
        base = llama_args(by_type["full_attention"])
        local = by_type.get("sliding_attention") or (
            {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else None)
        n, window = base.n_layers, cfg["sliding_window"]
        pattern = cfg.get("sliding_window_pattern") or DEFAULT_PATTERN[variant]
        types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                           for i in range(n)]
        return cls(**_fields(base), variant=variant, norm_offset=1.0,
                   attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
                   attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
                   layer_windows=_windows(types, window, n),
                   local_rope=llama_args(local).rope if local is not None else None)

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf(arch, meta, shapes)
        n, window = base.n_layers, int(meta[f"{arch}.attention.sliding_window"])
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", DEFAULT_PATTERN[arch])
        if isinstance(pattern, (list, tuple)):  # llama.cpp's per-layer form: True where the layer is local
            types = ["sliding_attention" if local else "full_attention" for local in pattern]
        else:
            types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n)]
        scale = meta.get(f"{arch}.attention.scale")
        if scale is None:
            scale = (base.dim / base.n_heads if n == LLAMA_CPP_27B_LAYERS[arch] else base.head_dim) ** -0.5
        local_rope = None  # Gemma 2: the global rope; Gemma 3: its own base (llama.cpp's default 10000), unscaled
        if arch == "gemma3":
            local_rope = RopeConfig(dim=base.rope.dim, theta=float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)),
                                    style="neox")
        return cls(**_fields(base), variant=arch, norm_offset=0.0, attn_scale=float(scale),
                   attn_softcap=meta.get(f"{arch}.attn_logit_softcapping"),
                   final_softcap=meta.get(f"{arch}.final_logit_softcapping"),
                   layer_windows=_windows(types, window, n), local_rope=local_rope)


def _fields(base: llama.ModelArgs) -> dict[str, Any]:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(llama.ModelArgs)}
    fields.pop("variant")
    return fields


def _windows(types: list[str], window: int, n_layers: int) -> tuple:
    """Every layer's window (None for global layers) from its transformers layer type."""
    from ..errors import ModelFileError

    if len(types) != n_layers:
        raise ModelFileError(f"{len(types)} layer types for {n_layers} layers")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ModelFileError(f"unknown layer types {unknown} (sliding_attention and full_attention are known)")
    if window <= 0 and "sliding_attention" in types:
        raise ModelFileError(f"sliding window {window} for the local layers: it must be a positive number of tokens")
    return tuple(window if t == "sliding_attention" else None for t in types)


class Block(nn.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(geglu(norm(x))); q/k/v and gate/up each
    one fused pass. Local or global is the StepInputs' business (the executor hands each layer
    its window's masks and, for Gemma 3, its rope tables)."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.args = args
        d, hd = args.dim, args.head_dim
        norm = partial(RMSNorm, offset=args.norm_offset)
        self.attn_norm = norm(d, args.norm_eps)
        self.attn_q = Linear(d, args.n_heads * hd)
        self.attn_k = Linear(d, args.n_kv_heads * hd)
        self.attn_v = Linear(d, args.n_kv_heads * hd)
        self.attn_output = Linear(args.n_heads * hd, d)
        self.post_attention_norm = norm(d, args.norm_eps)
        self.ffn_norm = norm(d, args.norm_eps)
        self.ffn_gate = Linear(d, args.ffn_dim)
        self.ffn_up = Linear(d, args.ffn_dim)
        self.ffn_down = Linear(args.ffn_dim, d)
        self.post_ffw_norm = norm(d, args.norm_eps)
        add_qk_norms(self, args, args.qk_norm, norm=norm)
        self.qkv = Fused(self.attn_q, self.attn_k, self.attn_v)
        self.gate_up = Fused(self.ffn_gate, self.ffn_up)
        self.attn_cfg = AttentionConfig(qk_norm=args.qk_norm)

    def attention(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None,
                  kv_of_head: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rope_qkv(self, x, step, self.attn_cfg, "neox")  # (B, H|Hkv, T, hd)
        return self.attn_output(cached_attention(q, k, v, kv, step, scale=self.args.attn_scale, kv_of_head=kv_of_head,
                                                 softcap=self.args.attn_softcap))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)  # (B, T, F) each
        return self.ffn_down(F.gelu(gate, approximate="tanh") * up)

    def forward(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(self.attn_norm(x), step, kv))
        return h + self.post_ffw_norm(self.feed_forward(self.ffn_norm(h)))


class Model(nn.Module):
    """Embeddings (scaled by sqrt(dim)) and head (final logits soft-capped where set)."""

    STEP_INPUTS_BY_WINDOW = True  # the executor passes step_inputs the layers' window

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = Embedding(args.vocab_size, args.dim)
        self.output_norm = RMSNorm(args.dim, args.norm_eps, offset=args.norm_offset)
        self.output = Linear(args.dim, args.vocab_size)
        self._inv_freq: dict[bool, torch.Tensor] = {}

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.token_embd(tokens)  # (B, T, D)
        return h * torch.tensor(math.sqrt(self.args.dim), dtype=h.dtype)  # rounded to the dtype, as transformers

    def step_inputs(self, positions: torch.Tensor, mask: torch.Tensor | None, window: int | None = None) -> StepInputs:
        local = window is not None and self.args.local_rope is not None
        if local not in self._inv_freq:
            self._inv_freq[local] = rope_inv_freq(self.args.local_rope if local else self.args.rope)
        cos, sin = rope_tables(self._inv_freq[local], positions)  # (B, 1, T, rot/2)
        return StepInputs(positions=positions, mask=mask, cos=cos, sin=sin)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.output_norm(h))  # (B, T, V)
        cap = self.args.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


# Hugging Face names -> GGUF names (see llama.py)
HF_NAME_RULES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", r"blk.\1.post_ffw_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),  # Gemma 3
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]

# Tensor-parallel split: llama's (separate q/k/v, gate/up); the post-norms run after the
# all-reduce (cluster/shard.py ShardBlock), on the whole output.
TENSOR_PARALLEL = llama.TENSOR_PARALLEL
