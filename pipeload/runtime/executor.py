"""The executor owns the loop over layers.

A forward step embeds the new tokens, then for each layer asks a layer source for the block
(resident: already there; streamed: wait for its bytes), runs it over the whole step (the full
prompt at prefill: one pass over the weights), and releases it. The same block code therefore
runs fully resident, streamed, or as one stage of a cluster.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import nn

from .kv_cache import KVCache


class LayerSource(Protocol):
    """Hands out the block of layer i, ready to run, and takes it back after use."""

    def acquire(self, i: int) -> nn.Module: ...

    def release(self, i: int) -> None: ...


class ResidentLayers:
    """All blocks in memory."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks

    def acquire(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, i: int) -> None:
        pass


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool: query at position p sees keys j <= p (and j > p - window)."""
    j = torch.arange(kv_len)
    p = positions[:, None, :, None]  # (B, 1, T, 1)
    mask = j <= p
    if window is not None:
        mask &= j > p - window
    return mask


class Executor:
    def __init__(self, model: nn.Module, layers: LayerSource, n_layers: int, window: int | None = None):
        self.model, self.layers, self.n_layers, self.window = model, layers, n_layers, window
        self.layer_seconds = [0.0] * n_layers  # compute time per layer, accumulated
        self.profile = False

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T) at positions (B, T); with logit_index (B,), only
        those positions' logits (B, V). The cache, if given, gains the new keys and values."""
        uniform = bool((positions == positions[:1]).all())
        if cache is not None:
            kv_len = cache.begin_step(positions, uniform)
        else:
            kv_len = positions.shape[1]
        start = int(positions[0, 0])
        plain_causal = uniform and (start == 0 or positions.shape[1] == 1) and (
            self.window is None or kv_len <= self.window)
        mask = None if plain_causal else attention_mask(positions, kv_len, self.window)

        h = self.model.embed(tokens, positions)  # (B, T, D)
        step = self.model.step_inputs(positions, mask)
        for i in range(self.n_layers):
            block = self.layers.acquire(i)
            t0 = time.perf_counter() if self.profile else 0.0
            h = block(h, step, cache.layer(i) if cache is not None else None)
            if self.profile:
                self.layer_seconds[i] += time.perf_counter() - t0
            self.layers.release(i)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0]), logit_index]  # (B, D): only the rows we sample from
        return self.model.head(h).float()
