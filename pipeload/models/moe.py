"""Mixture of experts: the pieces the MoE architectures share (mixtral.py, qwen_moe.py, olmoe.py).

A sparse feed-forward layer has E routed experts (each a SwiGLU MLP with its own gate, up and
down matrices) and a router (`ffn_gate_inp`, E x D). For each token the router's softmax picks
the top k experts; the token's output is the weighted sum of those k experts' outputs, the
weights renormalised over the chosen k or not (`norm_topk`). Qwen2-MoE adds a shared expert
that every token uses, scaled by its own sigmoid gate (`ffn_gate_inp_shexp`).

Routed experts are not the block's own tensors. The block asks an `ExpertSource` for the
experts its router chose, after routing, and computes each as it arrives:
- `HeldExperts`: every expert resident (views into the layer's bytes, runtime/blocks.py);
- the runtime's expert cache (runtime/experts.py): reads only the chosen experts, as byte
  ranges of the stacked GGUF tensors, into a budgeted cache, and may read ahead the next
  layer's likely experts from the hidden state it is handed.
Results never depend on the order experts arrive in: each (token, rank) output goes to its own
place and the weighted sum runs in rank order, so a streamed run has the resident run's bits.

Pure torch plus quant.ops; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from ..quant import ops
from ..quant.ops import GGMLWeight
from .common import (AttentionConfig, Fused, LayerKV, Linear, RMSNorm, StepInputs, add_qk_norms,  # noqa: F401
                     cached_attention, rope_qkv)


_LAYER = r"model\.layers\.(\d+)\."
# HF -> GGUF names of the attention q/k norms, the router and the routed experts (one tensor per
# expert, or transformers' stacked gate_up/down), shared by the Qwen-MoE family and OLMoE.
QK_NORM_ROUTED_EXPERT_RULES = [
    (_LAYER + r"self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (_LAYER + r"self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (_LAYER + r"mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (_LAYER + r"mlp\.experts\.(\d+)\.gate_proj\.weight", r"blk.\1.ffn_gate_exps.\2.weight"),
    (_LAYER + r"mlp\.experts\.(\d+)\.up_proj\.weight", r"blk.\1.ffn_up_exps.\2.weight"),
    (_LAYER + r"mlp\.experts\.(\d+)\.down_proj\.weight", r"blk.\1.ffn_down_exps.\2.weight"),
    (_LAYER + r"mlp\.experts\.gate_up_proj", r"blk.\1.ffn_gate_up_exps.weight"),
    (_LAYER + r"mlp\.experts\.down_proj", r"blk.\1.ffn_down_exps.weight"),
]

ExpertWeights = tuple[GGMLWeight, GGMLWeight, GGMLWeight]  # gate (F, D), up (F, D), down (D, F), as stored
EXPERT_PARTS = ("gate", "up", "down")
TENSOR_PARALLEL = False  # MoE blocks are placed whole (pipeline parallel); see runtime/blocks.py
MIXTURE_OF_EXPERTS = True  # blocks built by runtime/moe_blocks.py


class ExpertSource(Protocol):
    """Where a block's routed experts come from."""

    def fetch(self, layer: int, experts: list[int], hidden: torch.Tensor) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """(expert, its weights) for each of `experts` (distinct, ascending), in groups of
        experts ready together, in any order (a streaming source yields what it holds, then
        the rest as their reads complete). `hidden` (N, D) is the residual stream entering this
        layer's feed-forward: a source may apply the next layer's router to it to guess and
        start reading that layer's experts."""
        ...


class HeldExperts:
    """Every expert of one layer in memory: a list of ExpertWeights indexed by expert."""

    def __init__(self, experts: list[ExpertWeights]):
        self.experts = experts

    def fetch(self, layer: int, experts: list[int], hidden: torch.Tensor) -> Iterator[list[tuple[int, ExpertWeights]]]:
        yield [(e, self.experts[e]) for e in experts]


@dataclass(frozen=True)
class MoEConfig:
    """How a layer routes: E experts of hidden size `ffn_dim`, top `top_k` per token."""

    n_experts: int
    top_k: int
    ffn_dim: int
    norm_topk: bool                  # renormalise the chosen k weights to sum to 1
    shared_ffn_dim: int | None = None  # Qwen2-MoE's shared expert (with its sigmoid gate)


def route(logits: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (N, k) float32, experts (N, k) int64) of router logits (N, E): softmax over all
    experts in float32, the k largest, renormalised over those k when `norm_topk`."""
    probs = torch.softmax(logits.float(), dim=-1)       # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def router_logits(router: Linear, x: torch.Tensor) -> torch.Tensor:
    """Router logits (N, E) float32 of x (N, D): routing decisions are taken in float32 whatever
    the compute dtype (a bfloat16 near-tie would otherwise pick another expert than llama.cpp)."""
    return ops.linear(x.float(), router.weight)


_VECTOR = 64          # values torch's vectorized elementwise loops take at a time (2 x 32 bfloat16)
_GRAIN = 32768        # values above which torch splits an elementwise op between threads


def swiglu_rows(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u of (n, F) rows, each row's bits independent of the rows computed with it.

    torch's elementwise loops run whole vectors, and the last numel % 64 values of a tensor (or
    of a thread's share) through a scalar path that rounds differently: a row that does not start
    on a vector boundary could get other bits in another batch or read group. So rows go in
    chunks that keep every row on boundaries and under the threading grain, one at a time when F
    is not whole vectors."""
    n, f = g.shape
    if f % _VECTOR:
        step = 1
    else:
        step = max(1, _GRAIN // f)
    if n <= step:
        return F.silu(g) * u
    return torch.cat([F.silu(g[i:i + step]) * u[i:i + step] for i in range(0, n, step)])


class SparseMoE(nn.Module):
    """The routed experts (and the optional shared expert) of one layer over its normed input.

    The router and shared-expert linears are the block's own submodules, under their GGUF names;
    this module only groups them (a plain list: not registered twice). `experts` is set by the
    block builder."""

    def __init__(self, cfg: MoEConfig, layer: int, router: Linear, shared: tuple[Linear, Linear, Linear] | None = None,
                 shared_gate: Linear | None = None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # a plain dict, not attributes: assigning modules would register them a second time
        self.parts = {"router": router, "shared": shared, "shared_gate": shared_gate}
        self.experts: ExpertSource | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The feed-forward output (B, T, D) for the normed input x (B, T, D); `residual`
        (B, T, D) is the un-normed stream, handed to the expert source for its guesses."""
        if self.experts is None:
            raise RuntimeError(f"layer {self.layer}: no expert source was given to this block")
        B, T, D = x.shape
        xf = x.reshape(-1, D)                                                    # (N, D)
        weights, chosen = route(router_logits(self.parts["router"], xf), self.cfg.top_k, self.cfg.norm_topk)  # (N, k)
        weights = weights.to(x.dtype)
        routed: dict[int, list[tuple[int, int]]] = {}                           # expert -> its (token, rank)s
        for t, row in enumerate(chosen.tolist()):
            for r, e in enumerate(row):
                routed.setdefault(e, []).append((t, r))
        picked = x.new_zeros(xf.shape[0] * self.cfg.top_k, D)                   # one place per (token, rank)
        for group in self.experts.fetch(self.layer, sorted(routed), residual.reshape(-1, D)):
            lone = [(e, w) for e, w in group if len(routed[e]) == 1]
            if lone:  # experts one row uses (all of them in a decode step): one kernel call for the lot
                places = [t * self.cfg.top_k + r for e, _ in lone for t, r in routed[e]]
                # (P, D); one row (decode) pairs with every weight as it is (no gathered copy)
                rows = xf if xf.shape[0] == 1 else xf[[routed[e][0][0] for e, _ in lone]]
                gu = ops.linear_paired(rows, [w[0] for _, w in lone] + [w[1] for _, w in lone])  # (2P, F)
                h = swiglu_rows(gu[:len(lone)], gu[len(lone):])                  # (P, F)
                picked[places] = ops.linear_paired(h, [w[2] for _, w in lone])   # (P, D)
            for e, (gate, up, down) in group:  # experts several rows use: each weight read once for them
                if len(routed[e]) > 1:
                    tokens = [t for t, _ in routed[e]]
                    g, u = ops.linear_many(xf[tokens], [gate, up])               # (n, F) each
                    picked[[t * self.cfg.top_k + r for t, r in routed[e]]] = ops.linear(swiglu_rows(g, u), down)
        picked = picked.view(-1, self.cfg.top_k, D)                              # (N, k, D)
        out = weights[:, 0, None] * picked[:, 0]                                 # (N, D), summed in rank order
        for r in range(1, self.cfg.top_k):
            out = out + weights[:, r, None] * picked[:, r]
        if self.parts["shared"] is not None:
            g_s, u_s, d_s = self.parts["shared"]
            sg, su = ops.linear_many(xf, [g_s.weight, u_s.weight])
            shared = ops.linear(F.silu(sg) * su, d_s.weight)                    # (N, D)
            if self.parts["shared_gate"] is not None:
                shared = torch.sigmoid(ops.linear(xf, self.parts["shared_gate"].weight)) * shared
            out = out + shared
        return out.view(B, T, D)


class MoEBlock(nn.Module):
    """Pre-norm transformer block with a sparse feed-forward: x + attn(norm(x)), then
    x + moe(norm(x)). Attention is Llama's (grouped-query, rope, fused q/k/v), with the
    family's AttentionConfig."""

    def __init__(self, args, layer: int, attn: AttentionConfig, moe: MoEConfig, shared_gate: bool = False):
        super().__init__()
        self.args, self.layer, self.attn_cfg = args, layer, attn
        d, hd = args.dim, args.head_dim
        self.attn_norm = RMSNorm(d, args.norm_eps)
        self.attn_q = Linear(d, args.n_heads * hd, bias=attn.qkv_bias)
        self.attn_k = Linear(d, args.n_kv_heads * hd, bias=attn.qkv_bias)
        self.attn_v = Linear(d, args.n_kv_heads * hd, bias=attn.qkv_bias)
        self.attn_output = Linear(args.n_heads * hd, d)
        add_qk_norms(self, args, attn.qk_norm)
        self.qkv = Fused(self.attn_q, self.attn_k, self.attn_v)
        self.ffn_norm = RMSNorm(d, args.norm_eps)
        self.ffn_gate_inp = Linear(d, moe.n_experts)
        shared = None
        if moe.shared_ffn_dim:
            self.ffn_gate_shexp = Linear(d, moe.shared_ffn_dim)
            self.ffn_up_shexp = Linear(d, moe.shared_ffn_dim)
            self.ffn_down_shexp = Linear(moe.shared_ffn_dim, d)
            shared = (self.ffn_gate_shexp, self.ffn_up_shexp, self.ffn_down_shexp)
        if shared_gate:
            self.ffn_gate_inp_shexp = Linear(d, 1)
        self.moe = SparseMoE(moe, layer, self.ffn_gate_inp, shared, self.ffn_gate_inp_shexp if shared_gate else None)

    def attention(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None) -> torch.Tensor:
        q, k, v = rope_qkv(self, x, step, self.attn_cfg, self.args.rope.style)
        return self.attn_output(cached_attention(q, k, v, kv, step))

    def forward(self, x: torch.Tensor, step: StepInputs, kv: LayerKV | None) -> torch.Tensor:
        h = x + self.attention(self.attn_norm(x), step, kv)
        return h + self.moe(self.ffn_norm(h), h)


def sparse_layers(block: nn.Module) -> list[SparseMoE]:
    """The SparseMoE modules of a block (empty for a dense block)."""
    return [m for m in block.modules() if isinstance(m, SparseMoE)]


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint's expert settings against its tensors (clear errors naming the key)


def check_routing(n_experts, top_k, count_key: str, used_key: str, where: str) -> None:
    """Raise ModelFileError unless 1 <= top_k <= n_experts (naming the keys)."""
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ModelFileError(f"{where}: {count_key} = {n_experts!r} is not a positive number of experts")
    if not isinstance(top_k, int) or top_k < 1:
        raise ModelFileError(f"{where}: {used_key} = {top_k!r} is not a positive number of experts per token")
    if top_k > n_experts:
        raise ModelFileError(f"{where}: {used_key} = {top_k} is larger than {count_key} = {n_experts}: "
                             f"a token cannot use more experts than the layer has")


def check_stacked_shapes(shapes: dict[str, tuple[int, ...]], n_layers: int, n_experts: int, dim: int,
                         count_key: str) -> int:
    """The experts' hidden size, after checking every layer's stacked GGUF expert tensors
    (torch order: gate/up (E, F, D), down (E, D, F), or gate_up (E, 2F, D)) and router (E, D)
    against `n_experts`; raises ModelFileError naming the tensor and the key."""
    ffn = None
    for i in range(n_layers):
        router = shapes.get(f"blk.{i}.ffn_gate_inp.weight")
        if router is None:
            raise ModelFileError(f"layer {i}: no router tensor blk.{i}.ffn_gate_inp.weight")
        if router[0] != n_experts:
            raise ModelFileError(f"blk.{i}.ffn_gate_inp.weight routes to {router[0]} experts but {count_key} = "
                                 f"{n_experts}: the metadata and the tensors disagree")
        for part in ("gate", "up", "down", "gate_up"):
            name = f"blk.{i}.ffn_{part}_exps.weight"
            shape = shapes.get(name)
            if shape is None:
                continue
            if len(shape) != 3 or shape[0] != n_experts:
                raise ModelFileError(f"{name} has shape {list(shape)}: {shape[0] if shape else '?'} experts, but "
                                     f"{count_key} = {n_experts}: the metadata and the tensors disagree")
            f = shape[2] if part == "down" else shape[1] // (2 if part == "gate_up" else 1)
            if (shape[1] if part == "down" else shape[2]) != dim or (ffn is not None and f != ffn):
                raise ModelFileError(f"{name} has shape {list(shape)}, which does not fit hidden size {dim} "
                                     f"and expert size {ffn}")
            ffn = f
    if ffn is None:
        raise ModelFileError("no routed expert tensors (blk.N.ffn_{gate,up,down}_exps.weight) in this file")
    return ffn


def count_hf_experts(tensor_names: set[str], pattern: str, n_layers: int, n_experts: int, count_key: str) -> None:
    """Check that every layer of an HF checkpoint has exactly `n_experts` experts (per-expert
    tensors named by `pattern`.format(layer=i, expert=e)); raises ModelFileError naming the key."""
    import re

    rx = re.compile(pattern.format(layer=r"(\d+)", expert=r"(\d+)"))
    found: dict[int, set[int]] = {}
    for name in tensor_names:
        m = rx.fullmatch(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for i in range(n_layers):
        have = found.get(i, set())
        if have and have != set(range(n_experts)):
            raise ModelFileError(f"layer {i} has experts {sorted(have)[:4]}...{max(have)} ({len(have)} in all) but "
                                 f"config.json {count_key} = {n_experts}: the configuration and the tensors disagree")


def gguf_routing(arch: str, meta: dict, shapes: dict[str, tuple[int, ...]], n_layers: int, dim: int,
                 default_norm: bool) -> dict:
    """MoE settings from GGUF metadata (llama.cpp's keys), checked against the tensor shapes:
    {"n_experts", "top_k", "expert_ffn_dim", "norm_topk"}. `default_norm` is what llama.cpp
    does for this architecture when the file has no `{arch}.expert_weights_norm`. Raises
    ModelFileError naming the key, UnsupportedModelError for gating llama.cpp does not do here."""
    from ..errors import UnsupportedModelError

    count_key, used_key = f"{arch}.expert_count", f"{arch}.expert_used_count"
    n_experts, top_k = meta.get(count_key), meta.get(used_key)
    if n_experts is None:
        raise ModelFileError(f"GGUF metadata lacks {count_key!r} (the number of experts per layer)")
    if top_k is None:
        raise ModelFileError(f"GGUF metadata lacks {used_key!r} (the number of experts each token uses)")
    check_routing(n_experts, top_k, count_key, used_key, "GGUF metadata")
    ffn = check_stacked_shapes(shapes, n_layers, n_experts, dim, count_key)
    ffn_key = f"{arch}.expert_feed_forward_length"
    if meta.get(ffn_key) is not None and meta[ffn_key] != ffn:
        raise ModelFileError(f"GGUF metadata {ffn_key} = {meta[ffn_key]} but the expert tensors have {ffn} rows "
                             f"per expert: the metadata and the tensors disagree")
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating not in (None, 1):  # llama.cpp: 1 = softmax, 2 = sigmoid
        raise UnsupportedModelError(f"{arch}.expert_gating_func = {gating}: only softmax routing (1) is supported")
    scale = meta.get(f"{arch}.expert_weights_scale")
    if scale not in (None, 0.0, 1.0):
        raise UnsupportedModelError(f"{arch}.expert_weights_scale = {scale}: scaled expert weights are not supported")
    norm = meta.get(f"{arch}.expert_weights_norm", default_norm)
    return {"n_experts": n_experts, "top_k": top_k, "expert_ffn_dim": ffn, "norm_topk": bool(norm)}
