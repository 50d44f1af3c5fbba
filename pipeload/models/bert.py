"""BERT family: BERT, RoBERTa, XLM-RoBERTa (text encoders). Reads top to bottom:
args -> block -> model -> checkpoint names.

Post-norm blocks (x = norm(x + attention(x)), then x = norm(x + ffn(x))), bidirectional
attention with a key padding mask, learned absolute positions and token-type embeddings.
RoBERTa and XLM-R are the same network; their position table starts at pad_token_id + 1
(Hugging Face files keep the unused leading rows, llama.cpp's converter cuts them off), and they
have a single token type. The encoder has no head: pooling the hidden states into a sentence
vector is the caller's (pipeload/encoding/pooling.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .common import Embedding, Fused, LayerNorm, Linear, StepInputs, activation, bidirectional_attention

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    norm_eps: float
    context_length: int           # usable positions (rows of the table after position_offset)
    type_vocab_size: int = 0      # 0: the file has no token-type embeddings
    position_offset: int = 0      # rows of the position table before position 0 (HF RoBERTa: pad + 1)
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    variant: str = "bert"         # "bert", "roberta", "xlm-roberta", "camembert"
    tie_embeddings: bool = False  # an encoder has no output matrix to tie
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        kind = cfg.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise UnsupportedModelError(f"BERT position_embedding_type {kind!r} is not supported (absolute is)")
        activation(cfg.get("hidden_act", "gelu"), "BERT")  # refuse an unknown one now, not at the first input
        variant = cfg.get("model_type", "bert")
        pad = cfg.get("pad_token_id")
        pad = 0 if pad is None else pad
        offset = pad + 1 if variant in ROBERTA_TYPES else 0
        has_types = any(n.endswith("token_type_embeddings.weight") for n in tensor_names)
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("layer_norm_eps", 1e-12), context_length=cfg["max_position_embeddings"] - offset,
            type_vocab_size=cfg.get("type_vocab_size", 2) if has_types else 0, position_offset=offset,
            hidden_act=cfg.get("hidden_act", "gelu"), pad_token_id=pad, variant=variant,
        )

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        if meta.get(f"{arch}.attention.causal", False):
            raise UnsupportedModelError("a GGUF bert file with causal attention is not supported")
        types = shapes.get("token_types.weight")
        return cls(
            vocab_size=shapes["token_embd.weight"][0], dim=meta[f"{arch}.embedding_length"],
            n_layers=meta[f"{arch}.block_count"], n_heads=meta[f"{arch}.attention.head_count"],
            ffn_dim=meta[f"{arch}.feed_forward_length"],
            norm_eps=meta.get(f"{arch}.attention.layer_norm_epsilon", 1e-12),
            context_length=shapes["position_embd.weight"][0],
            type_vocab_size=types[0] if types else 0,
            # llama.cpp's bert graph applies GELU; HF BERTs use the exact (erf) one, so that is taken
            hidden_act="gelu", pad_token_id=meta.get("tokenizer.ggml.padding_token_id", 0),
        )


class Block(nn.Module):
    """Post-norm encoder block: h = norm(x + attention(x)); out = norm(h + ffn(h))."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.args = args
        d = args.dim
        self.attn_q = Linear(d, d, bias=True)
        self.attn_k = Linear(d, d, bias=True)
        self.attn_v = Linear(d, d, bias=True)
        self.attn_output = Linear(d, d, bias=True)
        self.attn_output_norm = LayerNorm(d, args.norm_eps)
        self.ffn_up = Linear(d, args.ffn_dim, bias=True)
        self.ffn_down = Linear(args.ffn_dim, d, bias=True)
        self.layer_output_norm = LayerNorm(d, args.norm_eps)
        self.qkv = Fused(self.attn_q, self.attn_k, self.attn_v)  # one ops.linear_many pass
        self._act = activation(args.hidden_act, "BERT")

    def attention(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.attn_output(bidirectional_attention(q, k, v, self.args.n_heads, self.args.head_dim, step.mask))

    def forward(self, x: torch.Tensor, step: StepInputs, kv: None = None) -> torch.Tensor:
        h = self.attn_output_norm(x + self.attention(x, step))
        return self.layer_output_norm(h + self.ffn_down(self._act(self.ffn_up(h))))


class Model(nn.Module):
    """Embeddings (token + position + token type, then a norm); the executor runs the blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.token_embd = Embedding(args.vocab_size, args.dim)
        self.position_embd = Embedding(args.context_length + args.position_offset, args.dim)
        self.token_types = Embedding(args.type_vocab_size, args.dim) if args.type_vocab_size else None
        self.token_embd_norm = LayerNorm(args.dim, args.norm_eps)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor,
              token_types: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, D) entering block 0 for tokens (B, T) at 0-based positions (B, T);
        token_types (B, T) default to type 0 (a single sentence)."""
        h = self.token_embd(tokens) + self.position_embd(positions + self.args.position_offset)
        if self.token_types is not None:
            types = token_types if token_types is not None else torch.zeros_like(tokens)
            h = h + self.token_types(types)
        return self.token_embd_norm(h)

    def step_inputs(self, positions: torch.Tensor, key_mask: torch.Tensor | None) -> StepInputs:
        """key_mask: (B, 1, 1, T) bool, True for each input's real tokens (None: no padding)."""
        return StepInputs(positions=positions, mask=key_mask)


# Hugging Face checkpoint names -> GGUF names (llama.cpp's bert names, which the modules carry);
# plain data: (pattern, GGUF name or None to drop)
_P = r"(?:bert\.|roberta\.)?"
_L = _P + r"encoder\.layer\.(\d+)\."
HF_NAME_RULES = [
    (_P + r"embeddings\.word_embeddings\.weight", "token_embd.weight"),
    (_P + r"embeddings\.position_embeddings\.weight", "position_embd.weight"),
    (_P + r"embeddings\.token_type_embeddings\.weight", "token_types.weight"),
    (_P + r"embeddings\.LayerNorm\.(weight|bias)", r"token_embd_norm.\1"),
    (_P + r"embeddings\.LayerNorm\.gamma", "token_embd_norm.weight"),
    (_P + r"embeddings\.LayerNorm\.beta", "token_embd_norm.bias"),
    (_L + r"attention\.self\.query\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (_L + r"attention\.self\.key\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (_L + r"attention\.self\.value\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"attention\.output\.LayerNorm\.(weight|bias)", r"blk.\1.attn_output_norm.\2"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (_L + r"output\.dense\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (_L + r"output\.LayerNorm\.(weight|bias)", r"blk.\1.layer_output_norm.\2"),
    # not part of a sentence embedding (llama.cpp's converter drops them too)
    (_P + r"embeddings\.position_ids", None),
    (_P + r"pooler\.dense\.(weight|bias)", None),
    (r"cls\.(predictions|seq_relationship)\..*", None),
    (r"lm_head\..*", None),
]

# the Model's tensors by layer group (the first part of their names): the planner and the block
# builder read them as the "embed" and "head" groups
EMBED_NAMES = ("token_embd", "position_embd", "token_types", "token_embd_norm")
HEAD_NAMES = ()


# ---------------------------------------------------------------------------------------------
# Export to GGUF with llama.cpp's conventions (its `bert` architecture)


def gguf_architecture(args: ModelArgs) -> str:
    return "bert"


def gguf_metadata(args: ModelArgs) -> dict[str, Any]:
    """GGUF key/values describing `args` under llama.cpp's names."""
    meta = {"context_length": args.context_length, "embedding_length": args.dim, "block_count": args.n_layers,
            "feed_forward_length": args.ffn_dim, "attention.head_count": args.n_heads,
            "attention.layer_norm_epsilon": float(args.norm_eps), "attention.causal": False}
    return {**{f"bert.{k}": v for k, v in meta.items()}, "tokenizer.ggml.token_type_count": max(1, args.type_vocab_size)}


def gguf_extra_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    return {}


def to_gguf_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """llama.cpp's bert files start the position table at position 0 (RoBERTa's leading rows cut)."""
    if name == "position_embd.weight" and args.position_offset:
        return t[args.position_offset:]
    return t
