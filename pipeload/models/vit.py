"""Vision Transformer: ViT and DeiT (image encoders and classifiers). Reads top to bottom:
args -> block -> model -> checkpoint names.

The image is cut into patches (one strided convolution), a learned CLS token (and DeiT's
distillation token) is put in front, learned positions are added; pre-norm blocks
(x + attention(norm(x)), then x + mlp(norm(x))) with bidirectional attention; a final norm. The
CLS token's final state is the image's embedding; a linear head on it gives the class logits
(DeiT with a teacher head: the mean of the CLS head and the distillation head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .common import Fused, LayerNorm, Linear, StepInputs, activation, bidirectional_attention


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    norm_eps: float
    image_size: int
    patch_size: int
    n_channels: int = 3
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    distillation_token: bool = False  # DeiT: a second learned token after CLS
    labels: tuple[str, ...] = ()      # class names of the head, in logit order; () without a head
    teacher_head: bool = False        # DeiT distilled: a second head on the distillation token
    variant: str = "vit"
    tie_embeddings: bool = False
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Sequence length: the patches plus the CLS (and distillation) token."""
        return self.n_patches + 1 + int(self.distillation_token)

    @property
    def context_length(self) -> int:
        return self.n_tokens

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], tensor_names: set[str]) -> "ModelArgs":
        activation(cfg.get("hidden_act", "gelu"), "ViT")
        size, patch = cfg.get("image_size", 224), cfg.get("patch_size", 16)
        if isinstance(size, (list, tuple)) or isinstance(patch, (list, tuple)):
            raise UnsupportedModelError(f"ViT with non-square image_size {size!r} or patch_size {patch!r} is not supported")
        has_head = any(n.endswith("classifier.weight") for n in tensor_names)
        id2label = cfg.get("id2label") or {}
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label)))
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            ffn_dim=cfg["intermediate_size"], norm_eps=cfg.get("layer_norm_eps", 1e-12), image_size=size,
            patch_size=patch, n_channels=cfg.get("num_channels", 3), qkv_bias=cfg.get("qkv_bias", True),
            hidden_act=cfg.get("hidden_act", "gelu"),
            distillation_token=any(n.endswith("embeddings.distillation_token") for n in tensor_names),
            labels=labels if has_head else (), teacher_head="distillation_classifier.weight" in tensor_names,
            variant=cfg.get("model_type", "vit"),
        )

    @classmethod
    def from_gguf(cls, arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> "ModelArgs":
        def key(name):
            return meta[f"{arch}.{name}"]

        return cls(
            dim=key("embedding_length"), n_layers=key("block_count"), n_heads=key("attention.head_count"),
            ffn_dim=key("feed_forward_length"), norm_eps=key("attention.layer_norm_epsilon"),
            image_size=key("image_size"), patch_size=key("patch_size"), n_channels=key("num_channels"),
            qkv_bias="blk.0.attn_q.bias" in shapes, hidden_act=meta.get(f"{arch}.hidden_act", "gelu"),
            distillation_token="dist_embd" in shapes,
            labels=tuple(meta.get(f"{arch}.classifier.output_labels", ())) if "cls.weight" in shapes else (),
            teacher_head="cls_dist.weight" in shapes,
        )


class Block(nn.Module):
    """Pre-norm encoder block: h = x + attention(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.args = args
        d = args.dim
        self.attn_norm = LayerNorm(d, args.norm_eps)
        self.attn_q = Linear(d, d, bias=args.qkv_bias)
        self.attn_k = Linear(d, d, bias=args.qkv_bias)
        self.attn_v = Linear(d, d, bias=args.qkv_bias)
        self.attn_output = Linear(d, d, bias=True)
        self.ffn_norm = LayerNorm(d, args.norm_eps)
        self.ffn_up = Linear(d, args.ffn_dim, bias=True)
        self.ffn_down = Linear(args.ffn_dim, d, bias=True)
        self.qkv = Fused(self.attn_q, self.attn_k, self.attn_v)  # one ops.linear_many pass
        self._act = activation(args.hidden_act, "ViT")

    def attention(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.attn_output(bidirectional_attention(q, k, v, self.args.n_heads, self.args.head_dim, step.mask))

    def forward(self, x: torch.Tensor, step: StepInputs, kv: None = None) -> torch.Tensor:
        h = x + self.attention(self.attn_norm(x), step)
        return h + self.ffn_down(self._act(self.ffn_up(self.ffn_norm(h))))


class Model(nn.Module):
    """Patch embedding and tokens in front; final norm and classifier head. The executor runs the
    blocks in between."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, p = args.dim, args.patch_size
        self.patch_embd = PatchEmbedding(args.n_channels, d, p)
        self.class_embd = nn.Parameter(torch.empty(1, 1, d, device="meta"), requires_grad=False)
        self.dist_embd = (nn.Parameter(torch.empty(1, 1, d, device="meta"), requires_grad=False)
                          if args.distillation_token else None)
        self.position_embd = nn.Parameter(torch.empty(1, args.n_tokens, d, device="meta"), requires_grad=False)
        self.output_norm = LayerNorm(d, args.norm_eps)
        n_labels = len(args.labels)
        self.cls = Linear(d, n_labels, bias=True) if n_labels else None
        self.cls_dist = Linear(d, n_labels, bias=True) if n_labels and args.teacher_head else None

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D) entering block 0 for preprocessed images (B, C, S, S)."""
        a = self.args
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (a.n_channels, a.image_size, a.image_size):
            raise ValueError(f"ViT input of shape {tuple(pixels.shape)}: expected (B, {a.n_channels}, "
                             f"{a.image_size}, {a.image_size}) (preprocess the images first)")
        patches = self.patch_embd(pixels)                                    # (B, N, D)
        B = patches.shape[0]
        front = [self.class_embd.expand(B, -1, -1)]                          # (B, 1, D)
        if self.dist_embd is not None:
            front.append(self.dist_embd.expand(B, -1, -1))
        return torch.cat([*front, patches], dim=1) + self.position_embd     # (B, T, D)

    def step_inputs(self, positions: torch.Tensor, key_mask: torch.Tensor | None = None) -> StepInputs:
        return StepInputs(positions=positions, mask=key_mask)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm of the last hidden state (B, T, D) -> (B, T, D); row 0 is the CLS token."""
        return self.output_norm(h)

    def classify(self, normed: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_labels) from the normed final states (B, T, D); raises ValueError for
        a model without a classifier head."""
        if self.cls is None:
            raise ValueError("this ViT has no classifier head (a ViTModel checkpoint): use embed instead of classify")
        logits = self.cls(normed[:, 0])
        if self.cls_dist is not None:  # DeiT distilled: average the CLS and distillation heads
            logits = (logits + self.cls_dist(normed[:, 1])) / 2
        return logits


class PatchEmbedding(nn.Module):
    """Non-overlapping patches of size p through one linear map each (a stride-p convolution)."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(dim, channels, patch, patch, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(pixels.to(self.weight.dtype), self.weight, self.bias, stride=self.patch)  # (B, D, S/p, S/p)
        return x.flatten(2).transpose(1, 2)                                                   # (B, N, D)


# Hugging Face checkpoint names -> GGUF-style names the modules carry; plain data:
# (pattern, name or None to drop)
_P = r"(?:vit\.|deit\.)?"
_L = _P + r"encoder\.layer\.(\d+)\."
HF_NAME_RULES = [
    (_P + r"embeddings\.cls_token", "class_embd"),
    (_P + r"embeddings\.distillation_token", "dist_embd"),
    (_P + r"embeddings\.position_embeddings", "position_embd"),
    (_P + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embd.\1"),
    (_L + r"layernorm_before\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (_L + r"attention\.attention\.query\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (_L + r"attention\.attention\.key\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (_L + r"attention\.attention\.value\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"layernorm_after\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (_L + r"output\.dense\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (_P + r"layernorm\.(weight|bias)", r"output_norm.\1"),
    (r"(?:cls_)?classifier\.(weight|bias)", r"cls.\1"),
    (r"distillation_classifier\.(weight|bias)", r"cls_dist.\1"),
    (_P + r"pooler\.dense\.(weight|bias)", None),  # ViTModel's tanh pooler: not the embedding used here
]

# the Model's tensors by layer group (the first part of their names): the planner and the block
# builder read them as the "embed" and "head" groups
EMBED_NAMES = ("patch_embd", "class_embd", "dist_embd", "position_embd")
HEAD_NAMES = ("output_norm", "cls", "cls_dist")


# ---------------------------------------------------------------------------------------------
# Export to GGUF (llama.cpp has no ViT classifier architecture: pipeload's own "vit" keys,
# named in llama.cpp's style)


def gguf_architecture(args: ModelArgs) -> str:
    return "vit"


def gguf_metadata(args: ModelArgs) -> dict[str, Any]:
    """GGUF key/values describing `args`."""
    meta = {"embedding_length": args.dim, "block_count": args.n_layers, "feed_forward_length": args.ffn_dim,
            "attention.head_count": args.n_heads, "attention.layer_norm_epsilon": float(args.norm_eps),
            "image_size": args.image_size, "patch_size": args.patch_size, "num_channels": args.n_channels,
            "hidden_act": args.hidden_act}
    if args.labels:
        meta["classifier.output_labels"] = list(args.labels)
    return {f"vit.{k}": v for k, v in meta.items()}


def gguf_extra_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    return {}


def to_gguf_tensor(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    return t
