"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Each sequence has its own random generator seeded from `seed` and its index, so a sequence's
tokens do not depend on what else is in the batch: same seed, same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-4  # below it sampling is greedy in all but name; the division stays finite


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off; >1 discourages tokens already in the context
    repetition_window: int = 64       # how many recent tokens the penalty looks at (llama.cpp's default)
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.repetition_window >= 0, f"repetition_window must be >= 0, got {self.repetition_window}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: float, window: int) -> torch.Tensor:
    """CTRL-style penalty: logits of recently seen tokens divided (if > 0) or multiplied by `penalty`."""
    if penalty == 1.0 or window == 0:
        return logits
    logits = logits.clone()
    for b, seen in enumerate(history):
        ids = torch.tensor(sorted(set(seen[-window:])), dtype=torch.long)
        if ids.numel():
            vals = logits[b, ids]
            logits[b, ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k, top-p and min-p, renormalised."""
    logits = logits / max(p.temperature, MIN_TEMPERATURE)  # (a tiny temperature would overflow to inf / nan)
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        drop = before >= p.top_p
        drop[..., 0] = False  # the first token always stays (a top_p that rounds to 0 in float32 kept none)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


class Sampler:
    """Samples one token per sequence; holds the per-sequence random generators."""

    def __init__(self, params: SamplingParams, batch: int):
        self.params = params
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generators = []
        for b in range(batch):
            g = torch.Generator()
            g.manual_seed(self.seed + b)
            self.generators.append(g)

    def probs(self, logits: torch.Tensor, history: list[list[int]]) -> torch.Tensor:
        """The distributions (B, V) sampling draws from (not greedy): penalty, temperature and the
        filters applied; rows that overflowed to non-finite values become one-hot on the argmax."""
        p = self.params
        logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty, p.repetition_window)
        probs = filter_probs(logits, p)
        broken = ~torch.isfinite(probs).all(-1)  # extreme parameters (a penalty of 1e-300) overflowed: greedy
        if broken.any():
            probs[broken] = torch.nn.functional.one_hot(logits[broken].nan_to_num(float("-inf")).argmax(-1),
                                                        probs.shape[-1]).to(probs.dtype)
        return probs

    def __call__(self, logits: torch.Tensor, history: list[list[int]], rows: list[int] | None = None) -> list[int]:
        """Next token for each row of logits (B, V); `rows` maps rows to sequence indices."""
        p = self.params
        if p.greedy:
            logits = apply_repetition_penalty(logits.float(), history, p.repetition_penalty, p.repetition_window)
            return logits.argmax(-1).tolist()
        probs = self.probs(logits, history)
        rows = rows if rows is not None else list(range(logits.shape[0]))
        return [int(torch.multinomial(probs[i], 1, generator=self.generators[s])) for i, s in enumerate(rows)]
