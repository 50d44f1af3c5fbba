"""Batched passes that give every sequence the same bits as a lone run.

CPU matrix kernels pick their blocking from the number of rows: `F.linear` on one row (a GEMV)
and on 2, 4 or 16 rows (GEMM) sum in different orders, and the packed int4/int8 linears switch
kernels at 16 rows, so a sequence decoded in a batch drifts from the same sequence decoded alone
by a few ulps, and greedy decoding can part at a near-tie.

Inside `with RowExact(rows):`, for one pass in which sequence b brings rows[b].length new tokens
from position rows[b].start (a decode step: one token each; a prefill: whole prompts from 0,
right-padded to the longest), the two operations whose result depends on the batch run on
exactly the shapes a lone run uses:

- linear layers: once per sequence on its own tokens, except where a call with one token per
  sequence is known to give each row the same bits as alone (checked once per kind of call, see
  `_rows_independent`: oneDNN's bfloat16 GEMM; the packed int4/int8 kernels, in groups of fewer
  rows than make those modules leave their kernel). The classes are in ROW_WISE_MODULES; their
  `forward` is wrapped once at import.
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
from contextlib import contextmanager
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


def run_per_row(cls: type, decode_rows: int = 1) -> type:
    """Make `cls.forward(x, ...)` run per sequence inside a RowExact pass; returns cls.

    x is (B, T, D) or (B, D). In a decode pass, up to `decode_rows` sequences go together (> 1 only
    for kernels whose rows do not depend on the other rows of the call, up to that many rows)."""
    forward = cls.forward
    if getattr(forward, "_row_exact", False):
        return cls

    @functools.wraps(forward)
    def split(self, x: torch.Tensor, *args, **kwargs):
        p = _PASS.get()
        if p is None or x.dim() not in (2, 3) or x.shape[0] != len(p.rows) or p.trivial:
            return forward(self, x, *args, **kwargs)
        if x.dim() == 2 or p.decode:  # one token per sequence
            if _rows_independent(forward, self, x, args, kwargs):
                return forward(self, x, *args, **kwargs)
            n = decode_rows if p.decode else 1
            return torch.cat([forward(self, x[b:b + n], *args, **kwargs) for b in range(0, x.shape[0], n)])
        with _dequantize_once(self):
            outs = [forward(self, x[b:b + 1, :row.length], *args, **kwargs) for b, row in enumerate(p.rows)]
        out = outs[0].new_zeros(x.shape[0], x.shape[1], outs[0].shape[-1])  # (B, T, N), padding stays 0
        for b, (row, o) in enumerate(zip(p.rows, outs)):
            out[b:b + 1, :row.length] = o
        return out

    split._row_exact = True
    cls.forward = split
    ROW_WISE_MODULES.append(cls)
    return cls


DEQUANT_MEMO_BYTES = 32 << 20  # unpacked weight rows kept for the other sequences of one prefill call


@contextmanager
def _dequantize_once(module):
    """While active, a packed module's `dequantized(r0, r1)` keeps what it unpacks (up to
    DEQUANT_MEMO_BYTES) for the other sequences of the same call: a prompt of 16+ tokens multiplies
    with the unpacked weight, which gives the same bits unpacked once or once per sequence."""
    unpack = getattr(module, "dequantized", None)
    if unpack is None:
        yield
        return
    memo: dict[tuple, torch.Tensor] = {}
    kept = [0]

    def once(*args: int) -> torch.Tensor:
        w = memo.get(args)
        if w is None:
            w = unpack(*args)
            if kept[0] + w.numel() * w.element_size() <= DEQUANT_MEMO_BYTES:
                memo[args] = w
                kept[0] += w.numel() * w.element_size()
        return w

    module.dequantized = once  # an instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del module.dequantized


_INDEPENDENT: dict[tuple, bool] = {}


def _rows_independent(forward, module, x: torch.Tensor, args, kwargs) -> bool:
    """Whether forward(module, x), one token per sequence, gives every row the bits of the same call
    on that row alone. Kernels choose their blocking from the shapes, never from the values, so
    this is checked once per kind of call (module class, input shape and dtype, weight dtype and
    shape) on random inputs with the module's own weights. Some are (oneDNN's bfloat16 GEMM, the
    packed int4/int8 kernels below 16 rows), some are not (float32 GEMV against GEMM)."""
    weight = getattr(module, "weight", None)
    weight = getattr(module, "qweight", None) if weight is None else weight
    key = (type(module), tuple(x.shape), x.dtype,
           None if weight is None else (weight.dtype, tuple(weight.shape), weight.stride()))
    known = _INDEPENDENT.get(key)
    if known is None:
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
        together = forward(module, probe, *args, **kwargs)
        alone = torch.cat([forward(module, probe[b:b + 1], *args, **kwargs) for b in range(x.shape[0])])
        known = _INDEPENDENT[key] = torch.equal(together, alone)
    return known


def _register_linears() -> None:
    from ..quant import linear

    run_per_row(linear.Linear)  # F.linear: one row is a GEMV, several a GEMM that sums in another order
    # The packed int4/int8 kernels give each row the same bits whatever the other rows are, but the
    # modules switch to a dequantized F.linear at PREFILL_ROWS rows: stay below it, as a lone step does.
    packed_rows = max(1, getattr(linear, "PREFILL_ROWS", 2) - 1)
    base = getattr(linear, "_PackedLinear", None)
    for cls in [base] if base is not None else [getattr(linear, n) for n in ("Int4Linear", "Int8Linear")
                                                 if hasattr(linear, n)]:
        run_per_row(cls, packed_rows)


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
