"""Batched passes that give every sequence the same bits as a lone run.

CPU matrix kernels pick their blocking from the number of rows: `F.linear` on one row (a GEMV)
and on 2, 4 or 16 rows (GEMM) sum in different orders, and the packed int4/int8 linears switch
kernels at 16 rows, so a sequence decoded in a batch drifts from the same sequence decoded alone
by a few ulps, and greedy decoding can part at a near-tie.

Inside `with RowExact(rows):`, for one pass in which sequence b brings rows[b].length new tokens
from position rows[b].start (a decode step: one token each; a prefill: whole prompts from 0,
right-padded to the longest), the two operations whose result depends on the batch run on
exactly the shapes a lone run uses:

- linear layers in a prefill: once per sequence on its own tokens (a decode step's rows are
  exact as they are: quant/ops.py's row-exactness contract). The classes are in
  ROW_WISE_MODULES; their `forward` is wrapped once at import.
- attention (`F.scaled_dot_product_attention`, wrapped once on first use): each sequence attends
  over its own keys only, with the causal flag or mask that its lone run would use.

Both wrappers do nothing unless a RowExact pass is active in the current thread. Everything else
(embeddings, norms, rotary tables, activations, sampling) is row-wise already; the outputs of
padding positions are zeros. The executor still makes one pass over the layers, so a streamed
layer is read once per pass for the whole batch; only the arithmetic is split
(`pipeload serve --fast-batching` shares the matrix products instead).

Limits (the scheduler respects them): prefill rows start at 0 and fit in one executor chunk.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PASS: ContextVar["RowExact | None"] = ContextVar("pipeload_row_exact_pass", default=None)
ROW_WISE_MODULES: list[type] = []
_plain_attention = None  # F.scaled_dot_product_attention before we wrapped it


@dataclass(frozen=True)
class RowSpan:
    """The new tokens of one sequence in a pass: `length` tokens from position `start`."""

    start: int
    length: int


def _stitch(outs: list, rows: list[RowSpan], batch: int, length: int):
    """Per-sequence outputs (1, n_b, N) (or lists of them) into (B, T, N) with zeros at padding."""
    if isinstance(outs[0], (list, tuple)):
        return [_stitch([o[j] for o in outs], rows, batch, length) for j in range(len(outs[0]))]
    out = outs[0].new_zeros(batch, length, outs[0].shape[-1])  # (B, T, N), padding stays 0
    for b, (row, o) in enumerate(zip(rows, outs)):
        out[b:b + 1, :row.length] = o
    return out


def run_per_row(cls: type) -> type:
    """Make `cls.forward(x, ...)` (x (B, T, D)) run per sequence in a RowExact prefill; returns cls.

    In a decode pass (one token per sequence) the call goes through whole: quant.ops gives every
    row the bits it gets alone for up to ops.EXACT_ROWS rows, and the scheduler's batches are no
    larger."""
    forward = cls.forward
    if getattr(forward, "_row_exact", False):
        return cls

    @functools.wraps(forward)
    def split(self, x: torch.Tensor, *args, **kwargs):
        p = _PASS.get()
        if p is None or x.dim() != 3 or x.shape[0] != len(p.rows) or p.trivial or p.decode:
            return forward(self, x, *args, **kwargs)
        outs = [forward(self, x[b:b + 1, :row.length], *args, **kwargs) for b, row in enumerate(p.rows)]
        return _stitch(outs, p.rows, x.shape[0], x.shape[1])

    split._row_exact = True
    cls.forward = split
    ROW_WISE_MODULES.append(cls)
    return cls


def _register_linears() -> None:
    from ..models.common import Fused, Linear

    run_per_row(Linear)  # one sequence's prompt rows together, as its lone run has them
    run_per_row(Fused)


_register_linears()


def _install_attention() -> None:
    """Wrap F.scaled_dot_product_attention (once per process) so that RowExact passes run it per row."""
    global _plain_attention
    if _plain_attention is not None:
        return
    plain = _plain_attention = F.scaled_dot_product_attention

    @functools.wraps(plain)
    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        p = _PASS.get()
        if p is None or p.trivial or q.shape[0] != len(p.rows):
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        return p.attention(plain, q, k, v, attn_mask, dropout_p, scale, enable_gqa)

    F.scaled_dot_product_attention = attention


class RowExact:
    """Context for one pass over len(rows) sequences; see the module docstring.

    `window` is the model's sliding window (None: full attention)."""

    def __init__(self, rows: list[RowSpan], window: int | None = None):
        self.rows, self.window = rows, window
        self.decode = all(r.length == 1 for r in rows)
        if not self.decode and any(r.start != 0 for r in rows):
            raise ValueError("RowExact passes are decode steps or prompts that start at position 0")
        self.trivial = len(rows) == 1  # one sequence alone is its own lone run
        self._token = None

    def __enter__(self) -> "RowExact":
        _install_attention()
        self._token = _PASS.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _PASS.reset(self._token)

    def attention(self, plain, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout_p: float, scale: float | None, enable_gqa: bool) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, Hkv, S, hd) -> (B, H, T, hd), each row as its lone run computes it."""
        if not self.decode and q.shape[2] != k.shape[2]:
            raise ValueError("a RowExact prefill must fit in one executor chunk")
        out = q.new_zeros(q.shape)
        for b, row in enumerate(self.rows):
            kv_len = row.start + row.length
            plain_causal = self.window is None or kv_len <= self.window  # as the executor decides alone
            mask = None
            if not plain_causal:
                if attn_mask is None:
                    raise ValueError("a sliding-window pass needs the executor's attention mask")
                mask = attn_mask[b:b + 1, :, :row.length, :kv_len]
            if row.length == 1 and mask is None:  # a lone decode step takes cached_attention's one-token path
                from ..models.common import one_token_attention

                H, hd = q.shape[1], q.shape[3]
                one = one_token_attention(q[b:b + 1, :, :1], k[b:b + 1, :, :kv_len], v[b:b + 1, :, :kv_len], scale)
                out[b:b + 1, :, :1] = one.view(1, 1, H, hd).transpose(1, 2)
                continue
            out[b:b + 1, :, :row.length] = plain(
                q[b:b + 1, :, :row.length], k[b:b + 1, :, :kv_len], v[b:b + 1, :, :kv_len], attn_mask=mask,
                dropout_p=dropout_p, is_causal=plain_causal and row.length > 1, scale=scale, enable_gqa=enable_gqa)
        return out
