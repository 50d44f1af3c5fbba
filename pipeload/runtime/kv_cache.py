"""The KV cache: keys and values of every layer for a batch of sequences, kept across steps.

The caller owns it (it is state, not part of the model). Each sequence b has its own absolute
positions; a step writes the new tokens' keys/values at their positions and attends to
positions 0..max(pos). Shorter prompts in a batch are right-padded: the pads' keys land beyond
the sequence's real length, are masked out, and are overwritten by the sequence's next tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)  # (L, B, Hkv, S_max, hd)
        self.v = torch.zeros(shape, dtype=dtype)
        self._write: slice | tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_needed(n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * batch * n_kv_heads * max_len * head_dim * torch.empty(0, dtype=dtype).element_size()

    def begin_step(self, positions: torch.Tensor, uniform: bool) -> int:
        """Prepare writes for the new tokens at `positions` (B, T); returns S, the keys attended to."""
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the KV cache ({self.max_len} positions)")
        if uniform:  # every sequence writes the same contiguous positions
            start = int(positions[0, 0])
            self._write = slice(start, start + positions.shape[1])
        else:
            rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)
            self._write = (rows, positions)
        self._kv_len = kv_len
        return kv_len

    def layer(self, i: int) -> "LayerView":
        return LayerView(self, i)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequences `index` (in that order): for dropping finished ones or beam search."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache of sequences start..stop-1 that shares this cache's storage (writes land here).

        The continuous-batching scheduler runs each step on the rows of its active slots."""
        if not 0 <= start < stop <= self.k.shape[1]:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {self.k.shape[1]} sequences")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view._write, view._kv_len = None, 0
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of sequence src into sequence dst (to keep slots packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class LayerView:
    """One layer of a KVCache for the current step (satisfies models.common.LayerKV)."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, w = self.cache, self.cache._write
        K, V = c.k[self.i], c.v[self.i]  # (B, Hkv, S_max, hd)
        if isinstance(w, slice):
            K[:, :, w] = k
            V[:, :, w] = v
        else:
            rows, pos = w
            K.transpose(1, 2)[rows, pos] = k.transpose(1, 2)  # (B, T, Hkv, hd) scattered
            V.transpose(1, 2)[rows, pos] = v.transpose(1, 2)
        return K[:, :, :c._kv_len], V[:, :, :c._kv_len]
