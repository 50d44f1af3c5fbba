"""OLMoE (AllenAI): Llama-style attention with RMSNorm over the whole q and k projections (not
per head) and optional clamping of q/k/v (`clip_qkv`), then top k of E experts, weights not
renormalised unless `norm_topk_prob`. Reads top to bottom: args -> block -> model -> names.
The neox rope layout in HF folders and in GGUF (llama.cpp's converter does not permute q/k).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from . import llama
from .moe import (QK_NORM_ROUTED_EXPERT_RULES, MIXTURE_OF_EXPERTS, TENSOR_PARALLEL, AttentionConfig, MoEBlock, MoEConfig,  # noqa: F401
                  check_routing, count_hf_experts, gguf_routing)


@dataclass
class ModelArgs(llama.ModelArgs):
    n_experts: int = 0
    top_k: int = 0
    expert_ffn_dim: int = 0
    norm_topk: bool = False
    clip_qkv: float | None = None

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(self.n_experts, self.top_k, self.expert_ffn_dim, self.norm_topk)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        base = llama.ModelArgs.from_hf_config.__func__(cls, cfg, tensor_names)
        count_key = "num_experts" if "num_experts" in cfg else "num_local_experts"  # transformers 5 writes the latter
        n_experts, top_k = cfg.get(count_key), cfg.get("num_experts_per_tok")
        check_routing(n_experts, top_k, count_key, "num_experts_per_tok", "config.json")
        count_hf_experts(tensor_names, r"model\.layers\.{layer}\.mlp\.experts\.{expert}\.gate_proj\.weight",
                         base.n_layers, n_experts, count_key)
        clip = cfg.get("clip_qkv")
        return replace(base, n_experts=n_experts, top_k=top_k, expert_ffn_dim=cfg["intermediate_size"],
                       norm_topk=bool(cfg.get("norm_topk_prob", False)), clip_qkv=float(clip) if clip else None)

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf.__func__(cls, arch, meta, shapes)
        routing = gguf_routing(arch, meta, shapes, base.n_layers, base.dim, default_norm=False)
        clip = meta.get(f"{arch}.attention.clamp_kqv")
        return replace(base, **routing, clip_qkv=float(clip) if clip else None)


class Block(MoEBlock):
    """Attention with whole-projection q/k norms, then the routed experts."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        attn = AttentionConfig(qkv_bias=args.qkv_bias, qk_norm="full", clip_qkv=args.clip_qkv)
        super().__init__(args, layer, attn, args.moe)


Model = llama.Model

HF_NAME_RULES = [
    *[rule for rule in llama.HF_NAME_RULES if "mlp" not in rule[0]],
    *QK_NORM_ROUTED_EXPERT_RULES,
]
