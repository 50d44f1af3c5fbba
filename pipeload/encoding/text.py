"""Texts -> token-id batches for an encoder: checked, truncated to the model's positions, sorted by
length and padded per batch with the mask that keeps padding out of every result."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ContextLengthError


@dataclass
class TextBatch:
    """Inputs padded to one length.

    ids:   (B, T) int64 token ids, padded on the right with pad_id
    mask:  (B, T) bool, True for real tokens
    order: (B,) which input (index into the caller's list) each row is
    """

    ids: torch.Tensor
    mask: torch.Tensor
    order: list[int]

    @property
    def positions(self) -> torch.Tensor:
        """(B, T) 0-based positions (padding positions are never attended to)."""
        return torch.arange(self.ids.shape[1]).expand_as(self.ids)

    @property
    def key_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, T) bool for attention, or None when no row is padded."""
        return None if bool(self.mask.all()) else self.mask[:, None, None, :]


def check_texts(texts, what: str = "embed") -> list[str]:
    """`texts` as a list of non-empty strings (a lone string becomes a list of one).

    Raises ValueError for an empty list, an empty string or a non-string item, naming which."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"{what}: expected a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{what}: the list of inputs is empty; pass at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what}: input {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"{what}: input {i} is an empty string; there is nothing to embed")
    return list(texts)


def tokenize(tokenizer, texts: list[str], max_tokens: int, truncate: bool = True,
             lowercase: bool = False) -> list[list[int]]:
    """Token ids of each text with the model's special tokens ([CLS] ... [SEP]).

    A text longer than max_tokens is cut to max_tokens (its content shortened, the special tokens
    kept, as Hugging Face's truncation does) with one warning per call, or, with truncate=False,
    raises ContextLengthError naming the input."""
    backend = tokenizer.backend
    n_special = backend.num_special_tokens_to_add(False)
    if max_tokens <= n_special:
        raise ValueError(f"max_tokens {max_tokens} leaves no room beside {n_special} special tokens")
    out, cut = [], []
    for i, text in enumerate(texts):
        enc = backend.encode(text.lower() if lowercase else text, add_special_tokens=False)
        if len(enc.ids) + n_special > max_tokens:
            if not truncate:
                raise ContextLengthError(f"input {i} has {len(enc.ids) + n_special} tokens, more than the "
                                         f"{max_tokens} this model takes; shorten it or pass truncate=True")
            enc.truncate(max_tokens - n_special)
            cut.append(i)
        out.append(backend.post_process(enc).ids)
    if cut:
        shown = ", ".join(map(str, cut[:5])) + (", ..." if len(cut) > 5 else "")
        warnings.warn(f"{len(cut)} of {len(texts)} inputs were longer than {max_tokens} tokens and were truncated "
                      f"(inputs {shown}); pass truncate=False to get an error instead", stacklevel=3)
    return out


def make_batches(token_ids: list[list[int]], batch_size: int, pad_id: int,
                 max_chunk_tokens: int | None = None) -> list[TextBatch]:
    """Inputs sorted by length (longest first) in batches of at most batch_size inputs (and, with
    max_chunk_tokens, at most that many padded tokens; at least one input), each padded to its own
    longest input, so that little compute is spent on padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batches, s = [], 0
    while s < len(order):
        T = len(token_ids[order[s]])
        n = batch_size if max_chunk_tokens is None else max(1, min(batch_size, max_chunk_tokens // T))
        rows = order[s:s + n]
        s += len(rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, i in enumerate(rows):
            k = len(token_ids[i])
            ids[r, :k] = torch.tensor(token_ids[i])
            mask[r, :k] = True
        batches.append(TextBatch(ids=ids, mask=mask, order=rows))
    return batches
