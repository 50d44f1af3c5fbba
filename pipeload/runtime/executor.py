"""The executor owns the loop over layers.

A forward step embeds the new tokens, then for each layer asks a layer source for the block
(resident: already there; streamed: wait for its bytes), runs it over the whole step, and
releases it; the head comes last the same way. A prompt therefore costs one pass over the
weights: a long prompt goes through each layer in chunks (bounded activations) before the next
layer is needed. The same block code runs fully resident, streamed, or as one cluster stage.

Exact batching (`rows`, one RowSpan per sequence): every sequence gets the bits of its lone
run, with nothing patched. A prefill runs each sequence through each layer on its own (its own
block call, chunks and KV rows, exactly as alone: the layer is still read once for all); a
decode step runs the linears over all rows together (quant/ops.py gives each row its lone bits
up to ops.EXACT_ROWS rows) and attention per row with the mask its lone step would use.
"""

from __future__ import annotations

import contextlib

import time
from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from ..models.common import RowSpan
from .kv_cache import KVCache

PREFILL_CHUNK = 512  # tokens per chunk when a long prompt goes through a layer
ENCODE_CHUNK = 2048  # padded tokens per chunk when an encoder pass goes through a layer


class LayerSource(Protocol):
    """Hands out the block of layer i (and the head), ready to run, and takes it back after use."""

    def acquire(self, i: int) -> nn.Module: ...

    def release(self, i: int) -> None: ...

    def acquire_head(self) -> nn.Module: ...

    def release_head(self) -> None: ...


class ResidentLayers:
    """All blocks in memory (a mixture of experts' routed experts may still be read on demand:
    `experts`, runtime/experts.py, whose reads `stats` counts)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], experts=None):
        self.model, self.blocks, self.experts = model, blocks, experts
        if experts is not None:
            self.stats = experts.stream_stats

    def acquire(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, i: int) -> None:
        pass

    def acquire_head(self) -> nn.Module:
        return self.model

    def release_head(self) -> None:
        pass

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool: query at position p sees keys j <= p (and j > p - window)."""
    j = torch.arange(kv_len)
    p = positions[:, None, :, None]  # (B, 1, T, 1)
    mask = j <= p
    if window is not None:
        mask &= j > p - window
    return mask


def layer_windows(args) -> list[int | None]:
    """The sliding window of every layer (None: global attention): `args.layer_windows` where
    layers differ (Gemma 2/3: local layers between global ones), else args.sliding_window for all."""
    per_layer = getattr(args, "layer_windows", None)
    return list(per_layer) if per_layer is not None else [getattr(args, "sliding_window", None)] * args.n_layers


class Executor:
    """Runs the blocks between the model's embeddings and head (see the module docstring).

    windows: the sliding window of every layer (a list, see layer_windows) or one for all (an int
    or None). Each step gets one StepInputs per distinct window, each with that window's masks;
    a model whose tables differ by window (Gemma 3's local rope base: `STEP_INPUTS_BY_WINDOW`)
    gets the window in `step_inputs(positions, mask, window=...)`."""

    def __init__(self, model: nn.Module, layers: LayerSource, n_layers: int, windows=None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.layers, self.n_layers = model, layers, n_layers
        self.windows = list(windows) if isinstance(windows, (list, tuple)) else [windows] * n_layers
        if len(self.windows) != n_layers:
            raise ValueError(f"{len(self.windows)} layer windows for {n_layers} layers")
        self.prefill_chunk = prefill_chunk
        self.layer_seconds = [0.0] * (n_layers + 1)  # compute time per layer (+ head), when profiling
        self.profile = False
        self.step_span = contextlib.nullcontext  # () -> context around each forward (a tracer's span)

    @staticmethod
    def _mask(pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor | None:
        """The attention mask of a chunk at positions pos (B, T) over kv_len keys; None when plain
        causal attention is the same (every sequence at the same positions, starting at 0 or one
        token, within the window). A lone sequence's decision and a batch's are this one rule."""
        uniform = bool((pos == pos[:1]).all())
        start = int(pos[0, 0])
        plain_causal = uniform and (start == 0 or pos.shape[1] == 1) and (window is None or kv_len <= window)
        return None if plain_causal else attention_mask(pos, kv_len, window)

    def _step_inputs(self, pos: torch.Tensor, kv_len: int, window: int | None, cache, rows, lone_queries):
        """The StepInputs of a chunk for the layers of one window (masks, rope tables, rows)."""
        mask = self._mask(pos, kv_len, window)
        if getattr(self.model, "STEP_INPUTS_BY_WINDOW", False):
            step = self.model.step_inputs(pos, mask, window=window)
        else:
            step = self.model.step_inputs(pos, mask)
        if rows is not None:
            step.rows = [replace(r, mask=self._mask(pos[b:b + 1], r.start + r.length if cache is not None
                                                    else r.length, window)) for b, r in enumerate(rows)]
        if lone_queries:
            step.lone_queries = [self._mask(pos[:, t:t + 1], int(pos[0, t]) + 1, window) for t in range(pos.shape[1])]
        return step

    def _chunk_inputs(self, positions: torch.Tensor, cache: KVCache | None, rows: list[RowSpan] | None = None,
                      lone_queries: bool = False):
        """Per chunk of the step: (slice, {window: StepInputs}, positions, uniform) with masks and
        rope tables; with `rows` (a decode step), each row's lone mask in StepInputs.rows; with
        lone_queries, each token's lone decode mask in StepInputs.lone_queries."""
        T = positions.shape[1]
        uniform = bool((positions == positions[:1]).all())
        chunks = []
        for s in range(0, T, self.prefill_chunk):
            pos = positions[:, s:s + self.prefill_chunk]
            kv_len = int(pos.max()) + 1 if cache is not None else pos.shape[1]
            if cache is None and s > 0:
                raise ValueError(f"a prompt longer than {self.prefill_chunk} tokens needs a KV cache")
            steps = {w: self._step_inputs(pos, kv_len, w, cache, rows, lone_queries) for w in dict.fromkeys(self.windows)}
            chunks.append((slice(s, s + pos.shape[1]), steps, pos, uniform))
        return chunks

    def _runs(self, positions: torch.Tensor, cache: KVCache | None, rows: list[RowSpan] | None,
              lone_queries: bool = False) -> list[tuple]:
        """The groups of rows that go through a block together: (batch rows, token columns, chunks,
        KV cache). One group for the whole step, or with `rows` in a prefill one per sequence."""
        B, T = positions.shape
        if rows is not None and len(rows) != B:
            raise ValueError(f"{len(rows)} row spans for a step of {B} sequences")
        if rows is None or len(rows) == 1 or all(r.length == 1 for r in rows):
            exact = rows if rows is not None and len(rows) > 1 else None
            return [(slice(0, B), slice(0, T), self._chunk_inputs(positions, cache, exact, lone_queries), cache)]
        runs = []
        for b, r in enumerate(rows):
            kv = cache.rows(b, b + 1) if cache is not None else None
            runs.append((slice(b, b + 1), slice(0, r.length), self._chunk_inputs(positions[b:b + 1, :r.length], kv), kv))
        return runs

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logit_index: torch.Tensor | None = None, rows: list[RowSpan] | None = None,
                lone_queries: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T) at positions (B, T); with logit_index (B,), only
        those positions' logits (B, V). The cache, if given, gains the new keys and values.
        With `rows` (one RowSpan(start, length) per sequence, its new tokens), every sequence
        gets its lone run's bits (see the module docstring). With lone_queries (one sequence, a
        cache), every token attends as its lone decode step would, so the T logits are bit for
        bit those of T decode steps, in one pass over the weights (speculative verification)."""
        if lone_queries and (cache is None or tokens.shape[0] != 1 or rows is not None):
            raise ValueError("lone_queries verifies one sequence over a KV cache (no rows)")
        with self.step_span():
            h = self.model.embed(tokens, positions)  # (B, T, D)
            h = self.forward_layers(h, positions, cache, 0, self.n_layers, rows, lone_queries)
            return self.head(h, logit_index)

    @torch.inference_mode()
    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                       start: int, stop: int, rows: list[RowSpan] | None = None,
                       lone_queries: bool = False) -> torch.Tensor:
        """The hidden state (B, T, D) after layers start..stop-1 (global indices) for the hidden
        state h (B, T, D) entering layer `start`; one pipeline stage runs exactly this."""
        runs = self._runs(positions, cache, rows, lone_queries)
        whole = len(runs) == 1 and len(runs[0][2]) == 1
        if whole and cache is not None:
            cache.begin_step(runs[0][2][0][2], runs[0][2][0][3])  # the same positions for every layer
        for i in range(start, stop):
            block = self.layers.acquire(i)
            t0 = time.perf_counter() if self.profile else 0.0
            window = self.windows[i]
            if whole:
                h = block(h, runs[0][2][0][1][window], cache.layer(i) if cache is not None else None)
            else:  # chunk after chunk (and sequence after sequence), all before the next layer
                out = torch.zeros_like(h)  # padding positions of shorter sequences stay 0
                for batch, cols, chunks, kv in runs:
                    hb = h[batch, cols]
                    for sl, steps, pos, uniform in chunks:
                        if kv is not None:
                            kv.begin_step(pos, uniform)
                        out[batch, cols][:, sl] = block(hb[:, sl], steps[window], kv.layer(i) if kv is not None else None)
                h = out
            if self.profile:
                self.layer_seconds[i] += time.perf_counter() - t0
            self.layers.release(i)
        return h

    @torch.inference_mode()
    def encode(self, hidden: list[torch.Tensor], steps: list, head=None) -> list:
        """An encoder pass: the final hidden states of every chunk (each (B_c, T_c, D), entering
        layer 0, with its StepInputs carrying its padding mask). Every chunk goes through layer i
        before layer i + 1 is asked for, so one pass over the weights serves all of them; there
        is no KV cache and no causal order. head(model, h), if given, is applied to each chunk's
        final state with the head group acquired (ViT: final norm and classifier)."""
        hidden = list(hidden)
        for i in range(self.n_layers):
            block = self.layers.acquire(i)
            t0 = time.perf_counter() if self.profile else 0.0
            for c, step in enumerate(steps):
                hidden[c] = block(hidden[c], step, None)  # the chunk's input is freed as its output lands
            if self.profile:
                self.layer_seconds[i] += time.perf_counter() - t0
            self.layers.release(i)
        if head is None:
            return hidden
        module = self.layers.acquire_head()
        try:
            return [head(module, h) for h in hidden]
        finally:
            self.layers.release_head()

    @torch.inference_mode()
    def head(self, h: torch.Tensor, logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of the final hidden state h (B, T, D): (B, T, V), or (B, V) for the
        positions logit_index (B,)."""
        if logit_index is not None:
            h = h[torch.arange(h.shape[0]), logit_index]  # (B, D): only the rows we sample from
        head = self.layers.acquire_head()
        t0 = time.perf_counter() if self.profile else 0.0
        logits = head.head(h).float()
        if self.profile:
            self.layer_seconds[-1] += time.perf_counter() - t0
        self.layers.release_head()
        return logits
