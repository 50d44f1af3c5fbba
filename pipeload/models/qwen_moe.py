"""Qwen2-MoE and Qwen3-MoE. Reads top to bottom: args -> block -> model -> checkpoint names.

- Qwen2-MoE: Qwen2's attention (q/k/v biases); top k of E experts (weights not renormalised
  unless `norm_topk_prob`) plus a shared expert every token uses, scaled by
  sigmoid(ffn_gate_inp_shexp . x).
- Qwen3-MoE: Qwen3's attention (no biases, RMSNorm of q and k per head); top k of E experts,
  renormalised over the chosen k (`norm_topk_prob`; llama.cpp always renormalises for GGUF
  qwen3moe).
Both use the neox rope layout in HF folders and in GGUF. Checkpoints with dense layers between
the sparse ones (`decoder_sparse_step` > 1, `mlp_only_layers`) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import UnsupportedModelError
from . import llama
from .moe import (QK_NORM_ROUTED_EXPERT_RULES, MIXTURE_OF_EXPERTS, TENSOR_PARALLEL, AttentionConfig, MoEBlock, MoEConfig,  # noqa: F401
                  check_routing, count_hf_experts, gguf_routing)


@dataclass
class ModelArgs(llama.ModelArgs):
    n_experts: int = 0
    top_k: int = 0
    expert_ffn_dim: int = 0
    norm_topk: bool = False
    shared_ffn_dim: int | None = None  # Qwen2-MoE's shared expert
    qk_norm: str | None = None         # "head" for Qwen3-MoE

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(self.n_experts, self.top_k, self.expert_ffn_dim, self.norm_topk, self.shared_ffn_dim)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        base = llama.ModelArgs.from_hf_config.__func__(cls, cfg, tensor_names)
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise UnsupportedModelError(
                f"config.json decoder_sparse_step = {cfg.get('decoder_sparse_step')}, mlp_only_layers = "
                f"{cfg.get('mlp_only_layers')}: dense layers between the sparse ones are not supported")
        count_key = "num_experts" if "num_experts" in cfg else "num_local_experts"  # transformers 5 writes the latter
        n_experts, top_k = cfg.get(count_key), cfg.get("num_experts_per_tok")
        check_routing(n_experts, top_k, count_key, "num_experts_per_tok", "config.json")
        count_hf_experts(tensor_names, r"model\.layers\.{layer}\.mlp\.experts\.{expert}\.gate_proj\.weight",
                         base.n_layers, n_experts, count_key)
        qwen3 = cfg.get("model_type") == "qwen3_moe"
        shared = cfg.get("shared_expert_intermediate_size") or None
        return replace(base, n_experts=n_experts, top_k=top_k, expert_ffn_dim=cfg["moe_intermediate_size"],
                       norm_topk=bool(cfg.get("norm_topk_prob", False)), shared_ffn_dim=None if qwen3 else shared,
                       qk_norm="head" if qwen3 else None)

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        if f"{arch}.feed_forward_length" not in meta:  # only used by dense layers, which these files do not have
            meta = {**meta, f"{arch}.feed_forward_length": meta.get(f"{arch}.expert_feed_forward_length", 1)}
        base = llama.ModelArgs.from_gguf.__func__(cls, arch, meta, shapes)
        qwen3 = arch == "qwen3moe"
        routing = gguf_routing(arch, meta, shapes, base.n_layers, base.dim, default_norm=qwen3)
        shared = shapes.get("blk.0.ffn_gate_shexp.weight")
        return replace(base, **routing, shared_ffn_dim=shared[0] if shared else None,
                       qk_norm="head" if qwen3 else None)


class Block(MoEBlock):
    """Qwen attention, then the routed experts (and Qwen2-MoE's gated shared expert)."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        attn = AttentionConfig(qkv_bias=args.qkv_bias, qk_norm=args.qk_norm)
        super().__init__(args, layer, attn, args.moe, shared_gate=args.shared_ffn_dim is not None)


Model = llama.Model

_LAYER = r"model\.layers\.(\d+)\."
HF_NAME_RULES = [
    *[rule for rule in llama.HF_NAME_RULES if "mlp" not in rule[0]],
    *QK_NORM_ROUTED_EXPERT_RULES,
    (_LAYER + r"mlp\.shared_expert\.gate_proj\.weight", r"blk.\1.ffn_gate_shexp.weight"),
    (_LAYER + r"mlp\.shared_expert\.up_proj\.weight", r"blk.\1.ffn_up_shexp.weight"),
    (_LAYER + r"mlp\.shared_expert\.down_proj\.weight", r"blk.\1.ffn_down_shexp.weight"),
    (_LAYER + r"mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
]
