"""Mixtral: Mistral's attention with a sparse feed-forward of E SwiGLU experts, top k of them
per token, weighted by the softmax over the chosen k. Reads top to bottom: args -> block ->
model -> checkpoint names.

GGUF files of Mixtral are GGUF "llama" files with `llama.expert_count` set (llama.cpp's
converter; q/k rows permuted for the interleaved rope, experts stacked in ffn_*_exps).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from . import llama
from .moe import (MIXTURE_OF_EXPERTS, TENSOR_PARALLEL, AttentionConfig, MoEBlock, MoEConfig,  # noqa: F401
                  check_routing, count_hf_experts, gguf_routing)


@dataclass
class ModelArgs(llama.ModelArgs):
    n_experts: int = 0
    top_k: int = 0
    expert_ffn_dim: int = 0

    @property
    def moe(self) -> MoEConfig:
        return MoEConfig(self.n_experts, self.top_k, self.expert_ffn_dim, norm_topk=True)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        base = llama.ModelArgs.from_hf_config.__func__(cls, cfg, tensor_names)
        n_experts, top_k = cfg.get("num_local_experts"), cfg.get("num_experts_per_tok")
        check_routing(n_experts, top_k, "num_local_experts", "num_experts_per_tok", "config.json")
        count_hf_experts(tensor_names, r"model\.layers\.{layer}\.block_sparse_moe\.experts\.{expert}\.w1\.weight",
                         base.n_layers, n_experts, "num_local_experts")
        return replace(base, n_experts=n_experts, top_k=top_k, expert_ffn_dim=cfg["intermediate_size"])

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf.__func__(cls, arch, meta, shapes)
        routing = gguf_routing(arch, meta, shapes, base.n_layers, base.dim, default_norm=True)
        routing.pop("norm_topk")  # Mixtral always renormalises over the chosen experts
        return replace(base, **routing)


class Block(MoEBlock):
    """Llama attention, then the routed experts."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__(args, layer, AttentionConfig(qkv_bias=args.qkv_bias), args.moe)


Model = llama.Model

# Hugging Face names -> GGUF names. Experts come one tensor per expert (`.3.` after the GGUF name:
# weights/experts.py stacks them by reference), or stacked as transformers 5 keeps them in memory.
HF_NAME_RULES = [
    *[rule for rule in llama.HF_NAME_RULES if "mlp" not in rule[0]],
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"blk.\1.ffn_gate_exps.\2.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"blk.\1.ffn_up_exps.\2.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"blk.\1.ffn_down_exps.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj", r"blk.\1.ffn_gate_up_exps.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", r"blk.\1.ffn_down_exps.weight"),
]
