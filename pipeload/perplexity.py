"""Perplexity and bits per byte of a model on a text: `pipeload perplexity MODEL --text FILE`.

The text is tokenized once (with the tokenizer's BOS, if it adds one) and scored with a sliding
window (as Hugging Face's perplexity guide does): windows of `ctx` tokens advance by `stride`
(< ctx) tokens, and each window scores only the tokens no earlier window scored, so every token
after the first is predicted exactly once, with at least `ctx - stride` tokens of context (the
first window's tokens with less). Bits per byte divides the total negative
log-likelihood (in bits) by the bytes the scored tokens stand for, which makes models with
different tokenizers comparable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .runtime.engine import Engine


@dataclass
class PerplexityResult:
    perplexity: float       # exp(mean negative log-likelihood per scored token)
    bits_per_byte: float    # total NLL in bits / bytes of the scored tokens
    nll: float              # mean negative log-likelihood per scored token, nats
    tokens: int             # tokens scored
    bytes: int              # bytes those tokens stand for
    ctx: int
    stride: int
    windows: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | Path, max_bytes: int | None = None) -> str:
    """The text of a file: a .jsonl file's "text" fields joined by blank lines, else the file as
    UTF-8. `max_bytes` keeps only about that many leading bytes. Raises ValueError for a .jsonl
    line without a "text" field."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts, size = [], 0
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" string")
                texts.append(record["text"])
                size += len(record["text"].encode("utf-8")) + 2
                if max_bytes is not None and size >= max_bytes:
                    break
        text = "\n\n".join(texts)
    else:
        text = path.read_text(encoding="utf-8")
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return text


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over n_tokens tokens: the window feeds
    tokens begin..end-1 and scores targets first..end-1. The first window is [0, ctx) and scores
    1..ctx-1; each next one ends `stride` tokens later and scores only its last `stride` targets,
    so every target j >= 1 is scored once, with at least ctx - stride tokens of context."""
    if ctx < 2 or not 1 <= stride < ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= stride < ctx, got ctx={ctx}, stride={stride}")
    if n_tokens < 2:
        return []
    end = min(ctx, n_tokens)
    out = [(0, end, 1)]
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - ctx), end, first))
    return out


def _scored_logprobs(engine: Engine, ids: torch.Tensor, spans: list[tuple[int, int, int]]):
    """Per window: (first target, end, log-probabilities (end - first, V) float32 predicting them)."""
    cache = engine.new_cache(1, max(end - begin for begin, end, _ in spans))
    for begin, end, first in spans:
        tokens = ids[begin:end][None]                                   # (1, T)
        positions = torch.arange(end - begin)[None]                     # (1, T)
        logits = engine.executor.forward(tokens, positions, cache)[0]   # (T, V)
        yield first, end, torch.log_softmax(logits[first - 1 - begin:end - 1 - begin].float(), dim=-1)


@torch.inference_mode()
def token_nll(engine: Engine, ids: Sequence[int], ctx: int, stride: int,
              progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, int]:
    """(negative log-likelihood in nats of every target token 1..N-1 as float64 [N-1], windows run)."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n = ids_t.numel()
    nll = torch.full((max(n - 1, 0),), float("nan"), dtype=torch.float64)
    spans = windows(n, ctx, stride)
    for k, (first, end, logp) in enumerate(_scored_logprobs(engine, ids_t, spans)):
        nll[first - 1:end - 1] = -logp.gather(1, ids_t[first:end, None])[:, 0].double()
        if progress:
            progress(k + 1, len(spans))
    return nll, len(spans)


@torch.inference_mode()
def kl_divergence(engine: Engine, base: Engine, ids: Sequence[int], ctx: int, stride: int,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """How far `engine`'s next-token distributions are from `base`'s (e.g. a quantized model from
    its f16 original) on the same windows: mean KL(base || engine) in nats per token, and the
    fraction of tokens where both rank the same token first."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    spans = windows(ids_t.numel(), ctx, stride)
    kl_sum, same, count = 0.0, 0, 0
    pairs = zip(_scored_logprobs(engine, ids_t, spans), _scored_logprobs(base, ids_t, spans))
    for k, ((_, _, logp), (_, _, ref)) in enumerate(pairs):
        kl_sum += float((ref.exp() * (ref - logp)).sum(dim=-1).double().sum())
        same += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += ref.shape[0]
        if progress:
            progress(k + 1, len(spans))
    return {"kl_divergence": kl_sum / count, "same_top_token": same / count, "tokens": count}


@torch.inference_mode()
def compare(engines: dict[str, Engine], base: Engine, ids: Sequence[int], ctx: int, stride: int,
            progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Several models on the same windows in one pass: for each, the total NLL (nats) of the
    targets, mean KL(base || model) per token and the fraction of tokens whose top token agrees
    with `base`'s; `base` itself runs once per window."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    spans = windows(ids_t.numel(), ctx, stride)
    streams = {name: _scored_logprobs(e, ids_t, spans) for name, e in engines.items()}
    sums = {name: {"nll_sum": 0.0, "kl_sum": 0.0, "same": 0, "tokens": 0} for name in engines}
    for k, (first, end, ref) in enumerate(_scored_logprobs(base, ids_t, spans)):
        target = ids_t[first:end, None]
        for name, stream in streams.items():
            _, _, logp = next(stream)
            s = sums[name]
            s["nll_sum"] -= float(logp.gather(1, target).double().sum())
            s["kl_sum"] += float((ref.exp() * (ref - logp)).sum(dim=-1).double().sum())
            s["same"] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            s["tokens"] += ref.shape[0]
        if progress:
            progress(k + 1, len(spans))
    return {name: {"nll": s["nll_sum"] / s["tokens"], "perplexity": math.exp(s["nll_sum"] / s["tokens"]),
                   "nll_sum": s["nll_sum"], "kl_divergence": s["kl_sum"] / s["tokens"],
                   "same_top_token": s["same"] / s["tokens"], "tokens": s["tokens"]} for name, s in sums.items()}


def perplexity(engine: Engine, tokenizer, text: str, ctx: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity and bits per byte of `engine` on `text` (see the module docstring).

    ctx defaults to min(512, the model's context), stride to ctx // 2; max_tokens keeps only the
    first tokens of the text. Raises ValueError for a text of fewer than two tokens."""
    ctx = min(ctx or 512, engine.context_length)
    stride = min(stride or max(1, ctx // 2), ctx - 1)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    t0 = time.perf_counter()
    nll, n_windows = token_nll(engine, ids, ctx, stride, progress)
    seconds = time.perf_counter() - t0
    special = {tokenizer.bos_token_id, *tokenizer.eos_token_ids} - {None}
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in ids[1:] if t not in special)
    mean = float(nll.mean())
    return PerplexityResult(perplexity=math.exp(mean), bits_per_byte=float(nll.sum()) / math.log(2) / max(n_bytes, 1),
                            nll=mean, tokens=nll.numel(), bytes=n_bytes, ctx=ctx, stride=stride, windows=n_windows,
                            seconds=seconds)
