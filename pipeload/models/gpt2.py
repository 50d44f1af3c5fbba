"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused q/k/v. args -> block -> model -> names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .common import Embedding, LayerKV, LayerNorm, Linear, StepInputs, cached_attention


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    norm_eps: float
    context_length: int
    tie_embeddings: bool = True
    sliding_window: int | None = None
    head_dim: int = 0     # dim // n_heads (0: derived); a tensor-parallel shard keeps it
    n_kv_heads: int = 0   # every head has its own keys and values (0: n_heads)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.n_kv_heads = self.n_kv_heads or self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"GPT-2 activation {act!r} is not supported (gelu_new is)")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise UnsupportedModelError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                                        "reorder_and_upcast_attn are not supported")
        dim = cfg["n_embd"]
        return cls(vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["n_layer"], n_heads=cfg["n_head"],
                   ffn_dim=cfg.get("n_inner") or 4 * dim, norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                   context_length=cfg.get("n_positions", 1024),
                   tie_embeddings=not any(n.endswith("lm_head.weight") for n in tensor_names))

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        dim = meta["gpt2.embedding_length"]
        return cls(vocab_size=shapes["token_embd.weight"][0], dim=dim, n_layers=meta["gpt2.block_count"],
                   n_heads=meta["gpt2.attention.head_count"], ffn_dim=meta.get("gpt2.feed_forward_length", 4 * dim),
                   norm_eps=meta.get("gpt2.attention.layer_norm_epsilon", 1e-5),
                   context_length=meta.get("gpt2.context_length", 1024),
                   tie_embeddings="output.weight" not in shapes)


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)); q/k/v are one stored matrix (attn_qkv)."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.args = args
        d, inner = args.dim, args.n_heads * args.head_dim
        self.attn_norm = LayerNorm(d, args.norm_eps)
        self.attn_qkv = Linear(d, 3 * inner, bias=True)
        self.attn_output = Linear(inner, d, bias=True)
        self.ffn_norm = LayerNorm(d, args.norm_eps)
        self.ffn_up = Linear(d, args.ffn_dim, bias=True)
        self.ffn_down = Linear(args.ffn_dim, d, bias=True)

    def attention(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None,
                  kv_of_head: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        H, hd = self.args.n_heads, self.args.head_dim
        q, k, v = self.attn_qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        return self.attn_output(cached_attention(q, k, v, kv, step, kv_of_head=kv_of_head))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(F.gelu(self.ffn_up(x), approximate="tanh"))

    def forward(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None) -> torch.Tensor:
        h = x + self.attention(self.attn_norm(x), step, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class Model(nn.Module):
    """Embeddings (tokens and learned positions) and head; the executor runs the blocks between."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = Embedding(args.vocab_size, args.dim)
        self.position_embd = Embedding(args.context_length, args.dim)
        self.output_norm = LayerNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embd(tokens) + self.position_embd(positions)  # (B, T, D)

    def step_inputs(self, positions: torch.Tensor, mask: torch.Tensor | None) -> StepInputs:
        return StepInputs(positions=positions, mask=mask)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.output_norm(h))


# Hugging Face names -> GGUF names, as plain data (see llama.py). GPT-2 stores its matrices
# transposed (Conv1D, (in, out)): "transpose" makes the builder materialize them in torch's
# (out, in) order, once at load for a resident layer, once per read for a streamed one.
_P = r"(?:transformer\.)?"
HF_NAME_RULES = [
    (_P + r"wte\.weight", "token_embd.weight"),
    (_P + r"wpe\.weight", "position_embd.weight"),
    (_P + r"ln_f\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.weight", "output.weight"),
    (_P + r"h\.(\d+)\.ln_1\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (_P + r"h\.(\d+)\.ln_2\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (_P + r"h\.(\d+)\.attn\.c_attn\.weight", r"blk.\1.attn_qkv.weight", "transpose"),
    (_P + r"h\.(\d+)\.attn\.c_attn\.bias", r"blk.\1.attn_qkv.bias"),
    (_P + r"h\.(\d+)\.attn\.c_proj\.weight", r"blk.\1.attn_output.weight", "transpose"),
    (_P + r"h\.(\d+)\.attn\.c_proj\.bias", r"blk.\1.attn_output.bias"),
    (_P + r"h\.(\d+)\.mlp\.c_fc\.weight", r"blk.\1.ffn_up.weight", "transpose"),
    (_P + r"h\.(\d+)\.mlp\.c_fc\.bias", r"blk.\1.ffn_up.bias"),
    (_P + r"h\.(\d+)\.mlp\.c_proj\.weight", r"blk.\1.ffn_down.weight", "transpose"),
    (_P + r"h\.(\d+)\.mlp\.c_proj\.bias", r"blk.\1.ffn_down.bias"),
    (_P + r"h\.(\d+)\.attn\.(?:bias|masked_bias)", None),  # causal-mask buffers of old checkpoints
]


# Tensor-parallel split (see llama.py): attn_qkv stacks q, k and v, each split by heads.
TENSOR_PARALLEL = {
    "attn_qkv": ("rows", "heads", 3), "attn_output": ("columns", "heads"),
    "ffn_up": ("rows", "ffn"), "ffn_down": ("columns", "ffn"), "output": ("rows", "vocab"),
}


def gguf_architecture(args: ModelArgs) -> str:
    return "gpt2"


def gguf_metadata(args: ModelArgs) -> dict[str, Any]:
    """GGUF key/values describing `args` under llama.cpp's names."""
    meta = {"context_length": args.context_length, "embedding_length": args.dim, "block_count": args.n_layers,
            "feed_forward_length": args.ffn_dim, "attention.head_count": args.n_heads,
            "attention.layer_norm_epsilon": float(args.norm_eps), "vocab_size": args.vocab_size}
    return {f"gpt2.{k}": v for k, v in meta.items()}


def gguf_extra_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    return {}


def to_gguf_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    return t


# llama.cpp's gpt2 graph reads an explicit output matrix, so a tied one is written out
GGUF_WRITES_TIED_OUTPUT = True
