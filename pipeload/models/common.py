"""Pieces shared by the architectures: linears, norms, embeddings, rotary embeddings, attention.

Pure torch plus the compute operations of `quant.ops`; no I/O, no file names. Modules are built
empty and get their weights from the block builder (runtime/blocks.py), so no second copy of a
weight ever exists:

- `Linear` and `Embedding` hold a `GGMLWeight`: the matrix exactly as the file stores it (any
  GGUF type, F32/F16/BF16 included), computed on by `ops.linear` / decoded row by row;
- `Fused` runs several linears that read the same input (q/k/v, gate/up) as one
  `ops.linear_many` pass, each over its own GGMLWeight (nothing is concatenated or copied);
- norms hold their vectors as plain (meta, then real) Parameters.

Attribute names follow GGUF tensor names (`attn_q`, `ffn_down`, ...) so loading needs no
renaming table: the builder finds `blk.3.attn_q.weight` at `attn_q.weight` of block 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import ops
from ..quant.ops import GGMLWeight


class Linear(nn.Module):
    """y = x @ W^T + b, W a GGMLWeight (out_features, in_features) as stored, b a plain vector."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.weight: GGMLWeight | None = None  # given by the block builder
        self.bias: torch.Tensor | None = None  # (out_features,) in the compute dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = ops.linear(x.reshape(-1, shape[-1]), self.weight)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Fused(nn.Module):
    """Linears over the same input computed in one `ops.linear_many` pass (the activation is
    read and quantized once); returns their outputs separately, each with its own bits.

    The parts stay the block's own submodules under their file names; this module only groups
    them (they are kept in a plain list, so they are not registered twice)."""

    def __init__(self, *parts: Linear):
        super().__init__()
        self.parts = list(parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shape = x.shape
        ys = ops.linear_many(x.reshape(-1, shape[-1]), [p.weight for p in self.parts])  # [(M, N_j)]
        return [(y if p.bias is None else y + p.bias).view(*shape[:-1], p.out_features)
                for y, p in zip(ys, self.parts)]


class Split(nn.Module):
    """One stored matrix whose output rows stack several projections (Phi-3's attn_qkv, its
    gate/up ffn_up): one linear pass, returned as the parts of `sizes` (views, as Fused returns
    separate outputs). The Linear stays the block's own submodule; this module only splits it."""

    def __init__(self, linear: Linear, sizes: list[int]):
        super().__init__()
        if sum(sizes) != linear.out_features:
            raise ValueError(f"parts {sizes} do not add up to the matrix's {linear.out_features} rows")
        self.parts, self.sizes = [linear], list(sizes)  # a plain list: not registered twice

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.parts[0](x).split(self.sizes, dim=-1))  # [(..., N_j)]


class RMSNorm(nn.Module):
    """x / rms(x) * (weight + offset); offset 1 for checkpoints storing w of (1 + w) (Gemma's
    Hugging Face files; llama.cpp's converter adds the 1 into its GGUF)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 like the reference implementations, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return ((self.weight.float() + self.offset) * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    """Rows of a GGMLWeight (num, dim) looked up by id; only the rows looked up are decoded."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.num, self.dim = num, dim
        self.weight: GGMLWeight | None = None  # given by the block builder, kept as stored
        self.dtype = torch.float32              # of the rows returned (the compute dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        picked = GGMLWeight(w.qtype, (ids.numel(), self.dim), w.blocks[ids.reshape(-1)])  # (n, row bytes)
        return picked.dequantized(dtype=self.dtype).view(*ids.shape, self.dim)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings


@dataclass(frozen=True)
class RopeConfig:
    """How rotary embeddings are applied.

    style: "neox" rotates the two halves of each head (Hugging Face layout, GGUF qwen2);
           "interleaved" rotates adjacent pairs (GGUF llama, whose q/k rows llama.cpp permuted).
    dim:   number of leading head dimensions that rotate (= head_dim unless partial rotary).
    scaling: None, ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor,
             original_max_position_embeddings).
    """

    dim: int
    theta: float = 10000.0
    style: str = "neox"
    scaling: tuple | None = None


def rope_inv_freq(cfg: RopeConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies (dim/2,) float32, with the configured scaling or llama.cpp freq factors."""
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, cfg.dim, 2, dtype=torch.int64).float() / cfg.dim))
    if freq_factors is not None:  # GGUF rope_freqs tensor: llama.cpp divides theta by it
        return inv_freq / freq_factors.float()
    if cfg.scaling is None:
        return inv_freq
    kind = cfg.scaling[0]
    if kind == "linear":
        return inv_freq / cfg.scaling[1]
    if kind == "llama3":
        _, factor, low_ff, high_ff, old_ctx = cfg.scaling
        low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling {kind!r}")


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, dim/2) float32 for integer positions (B, T)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def rope_cis(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos + i sin as complex64: the interleaved rotation as one complex product (see apply_rope)."""
    return torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str,
               cis: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x (..., hd) by the given angles (cos, sin
    broadcast against x's leading dims). `cis` (= rope_cis(cos, sin)) makes the interleaved style
    one complex multiplication, with the same float32 products as the two-term formula."""
    rot = 2 * cos.shape[-1]
    xr, rest = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    xf = xr.float()
    if style == "neox":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    elif cis is not None and xf.stride(-1) == 1:  # interleaved pairs as complex numbers
        out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2)
    else:  # interleaved pairs (x0, x1), (x2, x3), ...
        pairs = xf.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = out.to(x.dtype)
    return out if rest is None else torch.cat((out, rest), dim=-1)


# ---------------------------------------------------------------------------------------------
# What the executor hands every block for one forward step


class LayerKV(Protocol):
    """One layer's KV cache: stores new keys/values and returns all keys/values to attend to."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, hd) for the step's positions -> (B, Hkv, S, hd) keys/values so far."""
        ...


@dataclass(frozen=True)
class RowSpan:
    """One sequence of a batched step: `length` new tokens from position `start`, and `mask`, the
    attention mask a lone step of that sequence uses ((1, 1, length, start + length) bool, None for
    plain causal attention). The executor fills the mask (runtime/executor.py)."""

    start: int
    length: int
    mask: torch.Tensor | None = None


@dataclass
class StepInputs:
    """Per-step tensors shared by all layers.

    positions: (B, T) absolute position of every new token
    mask:      (B, 1, T, S) bool, True where a query may attend; None means plain causal
               attention over a cache that starts at position 0 for every sequence
    cos, sin:  rotary tables (B, 1, T, rot/2), or None for architectures without rope
    cis:       optional complex64 cos + i sin (B, 1, T, rot/2) for the interleaved style
    rows:      None, or one RowSpan per sequence when every sequence must get the bits of its
               lone run (exact batching): attention then runs per sequence, as alone
    lone_queries: None, or (one sequence) one mask per new token, the mask its lone decode step
               would use ((1, 1, 1, p + 1) bool or None): each token then attends on its own over
               keys 0..p, bit for bit as that decode step (speculative verification)
    """

    positions: torch.Tensor
    mask: torch.Tensor | None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    cis: torch.Tensor | None = None
    rows: list[RowSpan] | None = None
    lone_queries: list[torch.Tensor | None] | None = None


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV | None,
                     step: StepInputs, scale: float | None = None,
                     kv_of_head: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over cached plus new k, v (B, Hkv, T, hd) -> (B, T, H*hd).
    kv_of_head (H,): the key/value head of each query head, where heads do not group evenly (a
    tensor-parallel shard's slice of grouped-query heads); softcap: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma 2). With step.rows, each sequence attends
    over its own keys exactly as its lone step would (the arithmetic of a batch of queries
    differs from one query's)."""
    if kv is not None:
        k, v = kv.update(k, v)  # (B, Hkv, S, hd)
    if kv_of_head is not None:
        k, v = k.index_select(1, kv_of_head), v.index_select(1, kv_of_head)  # (B, H, S, hd)
    if step.lone_queries is not None:  # each new token exactly as its lone decode step
        B, H, T, hd = q.shape
        if B != 1 or len(step.lone_queries) != T:
            raise ValueError(f"lone_queries needs one sequence and one mask per token, got B={B}, T={T}, "
                             f"{len(step.lone_queries)} masks")
        out = q.new_empty(1, T, H * hd)
        for t, mask in enumerate(step.lone_queries):
            n = int(step.positions[0, t]) + 1  # keys 0..p, as the decode step at p sees them
            out[:, t:t + 1] = attend(q[:, :, t:t + 1], k[:, :, :n], v[:, :, :n], mask, scale, softcap)
        return out
    if step.rows is None or len(step.rows) == 1:
        return attend(q, k, v, step.mask, scale, softcap)
    B, H, T, hd = q.shape
    out = q.new_zeros(B, T, H * hd)  # padding positions stay 0
    for b, row in enumerate(step.rows):
        kv_len = row.start + row.length if kv is not None else row.length
        out[b:b + 1, :row.length] = attend(q[b:b + 1, :, :row.length], k[b:b + 1, :, :kv_len],
                                           v[b:b + 1, :, :kv_len], row.mask, scale, softcap)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None, softcap: float | None = None) -> torch.Tensor:
    """Attention (B, T, H*hd) of q (B, H, T, hd) over k, v (B, Hkv, S, hd): the one-token path for
    a lone decode step, else SDPA with `mask` (None: causal, the new tokens last among the keys);
    with softcap, the scores spelled out (SDPA cannot cap them)."""
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    if q.shape[0] == 1 and q.shape[2] == 1 and mask is None:  # one sequence, one new token
        return one_token_attention(q, k, v, scale)
    if mask is None:
        causal = q.shape[2] > 1
        if causal and k.shape[2] != q.shape[2]:
            raise ValueError("a prefix cache needs an explicit mask")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    B, H, T, hd = out.shape
    return out.transpose(1, 2).reshape(B, T, H * hd)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float | None, softcap: float) -> torch.Tensor:
    """attend() with scores capped to (-softcap, softcap) by softcap * tanh(s / softcap), as
    transformers' eager Gemma 2 attention: float32 scores and softmax -> (B, T, H*hd)."""
    B, H, T, hd = q.shape
    S, group = k.shape[2], H // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else hd ** -0.5)  # (B, H, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # causal, the new tokens last among the keys
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(B, T, H * hd).to(q.dtype)


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention (1, 1, H*hd) of one query token (1, H, 1, hd) over (1, Hkv, S, hd), by ops.attend_one.

    PyTorch's CPU flash attention handles a single query poorly (0.4 ms at S = 128, 2 ms at 512 for
    a 1B model's layer, against 0.08 and 0.17 ms for two small float32 products)."""
    hd = q.shape[3]
    return ops.attend_one(q, k, v, scale if scale is not None else 1.0 / math.sqrt(hd))  # (1, 1, H*hd)


# ---------------------------------------------------------------------------------------------
# Decoder attention: q/k/v projections, optional q/k norms, rotary embeddings


@dataclass(frozen=True)
class AttentionConfig:
    """Attention variants of the decoder families: q/k/v biases (Qwen2), RMSNorm of q and k per
    head (Qwen3, Qwen3-MoE, Gemma 3) or over the whole projection (OLMoE), clamping of q/k/v
    (OLMoE)."""

    qkv_bias: bool = False
    qk_norm: str | None = None     # None, "head" or "full"
    clip_qkv: float | None = None


def add_qk_norms(block: nn.Module, args, qk_norm: str | None, norm: type = None) -> None:
    """Give `block` its q/k norms (`attn_q_norm`, `attn_k_norm`, GGUF names) for `qk_norm`
    ("head": one vector of head_dim shared by every head; "full": over the whole projection)."""
    norm = norm or RMSNorm
    if qk_norm == "head":
        block.attn_q_norm, block.attn_k_norm = norm(args.head_dim, args.norm_eps), norm(args.head_dim, args.norm_eps)
    elif qk_norm == "full":
        block.attn_q_norm = norm(args.n_heads * args.head_dim, args.norm_eps)
        block.attn_k_norm = norm(args.n_kv_heads * args.head_dim, args.norm_eps)
    elif qk_norm is not None:
        raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")


def rope_qkv(block: nn.Module, x: torch.Tensor, step: StepInputs, cfg: AttentionConfig,
             style: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T, hd), k, v (B, Hkv, T, hd) of the normed input x (B, T, D): the block's fused
    `qkv` pass, its q/k norms and clamping (cfg), then rotary embeddings of `style` from step's
    tables. The block has `args` (n_heads, n_kv_heads, head_dim), `qkv` and, with cfg.qk_norm,
    `attn_q_norm` / `attn_k_norm` (add_qk_norms)."""
    a = block.args
    B, T, _ = x.shape
    q, k, v = block.qkv(x)  # (B, T, H*hd), (B, T, Hkv*hd) x 2
    if cfg.qk_norm == "full":
        q, k = block.attn_q_norm(q), block.attn_k_norm(k)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(B, T, a.n_heads, a.head_dim)
    k = k.view(B, T, a.n_kv_heads, a.head_dim)
    v = v.view(B, T, a.n_kv_heads, a.head_dim)
    if cfg.qk_norm == "head":
        q, k = block.attn_q_norm(q), block.attn_k_norm(k)
    cos, sin = step.cos.transpose(1, 2), step.sin.transpose(1, 2)  # (B, T, 1, rot/2)
    cis = step.cis.transpose(1, 2) if step.cis is not None else None
    q = apply_rope(q, cos, sin, style, cis).transpose(1, 2)  # (B, H, T, hd)
    k = apply_rope(k, cos, sin, style, cis).transpose(1, 2)  # (B, Hkv, T, hd)
    return q, k, v.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Encoders (BERT, ViT): every token attends to every other token of its own input


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, head_dim: int,
                            key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q over k, v (each (B, T, n_heads * head_dim), split into heads here) with no
    causal order -> (B, T, n_heads * head_dim).

    key_mask (B, 1, 1, T) bool is True for the real tokens of each input and False for padding,
    so a padded input attends to exactly its own tokens (padded query rows are computed but mean
    nothing); None: every input fills all T positions."""
    B, T, _ = q.shape
    q, k, v = (y.view(B, T, n_heads, head_dim).transpose(1, 2) for y in (q, k, v))  # each (B, H, T, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)               # (B, H, T, hd)
    return out.transpose(1, 2).reshape(B, T, n_heads * head_dim)


# config.json `hidden_act` -> the function (exact erf GELU for "gelu", as transformers)
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, family: str):
    """The activation function config.json names; raises UnsupportedModelError for others."""
    from ..errors import UnsupportedModelError

    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{family} activation {name!r} is not supported ({', '.join(ACTIVATIONS)} are)")
    return ACTIVATIONS[name]
