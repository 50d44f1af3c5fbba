"""Speculative decoding (greedy): a draft proposes k tokens, the target checks all k + 1 positions
in one pass over its weights and keeps the longest prefix it agrees with, plus its own next token.

    last token x_p (not yet in the target's cache), drafts d_1..d_k
    one target pass over [x_p, d_1..d_k] at positions p..p+k  ->  logits l_0..l_k
    t_i = sample(l_i); d_{i+1} is accepted while d_{i+1} == t_i; the first t_i that differs is kept
    and ends the round

Exactness: the verification pass runs with `lone_queries` (runtime/executor.py): every token
attends on its own over keys 0..its position, as its lone decode step would, and the linears give
every row its lone bits (quant/ops.py), so the logits l_i are bit for bit those of plain decode
steps and greedy output is token for token the target's alone.

Rollback: the cache rows beyond the last accepted position hold rejected tokens' keys. Nothing
reads them: a later step at position q attends to keys 0..q only and overwrites q's row first.

Drafts: `ModelDraft` (a small resident model with the target's vocabulary, its own KV cache) and
`PromptLookup` (n-gram matches in the prompt and the text so far; no model). With
draft_tokens="auto", k follows the measured acceptance: up after a fully accepted round, down to
one more than what was accepted otherwise.

Sampling (temperature > 0) is not speculated here: the caller decodes it plainly
(runtime/generation.py), so sampled output stays exactly the target's.
"""

from __future__ import annotations

import time
from typing import Iterator, Protocol, Sequence

import torch

from ..errors import ContextLengthError
from .engine import Engine
from .memory import peak_rss
from .sampling import Sampler, SamplingParams

AUTO_START = 4      # first k with draft_tokens="auto"
AUTO_MAX = 16       # largest k "auto" grows to
LOOKUP_NGRAM = 3    # longest suffix prompt lookup matches (it falls back to shorter ones)


class Draft(Protocol):
    name: str

    def start(self, max_len: int) -> None:
        """A new sequence of at most max_len positions begins."""
        ...

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `history` (fewer, or none, when it has no guess)."""
        ...


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the text's last n tokens
    (n = LOOKUP_NGRAM down to 1), in the prompt or the text generated so far."""

    name = "prompt-lookup"

    def __init__(self, ngram: int = LOOKUP_NGRAM):
        if ngram < 1:
            raise ValueError(f"prompt lookup needs an n-gram of at least 1 token, got {ngram}")
        self.ngram = ngram

    def start(self, max_len: int) -> None:
        pass

    def propose(self, history: list[int], k: int) -> list[int]:
        L = len(history)
        for n in range(min(self.ngram, L - 1), 0, -1):
            tail = history[L - n:]
            for i in range(L - n - 1, -1, -1):  # latest earlier occurrence first
                if history[i:i + n] == tail:
                    return history[i + n:i + n + k]
        return []


class ModelDraft:
    """A small resident model of the target's vocabulary, decoding greedily on its own KV cache.

    It remembers the tokens its cache holds; each proposal first feeds, in one pass, whatever of
    the history it has not seen (or saw differently: rejected drafts), then k - 1 decode steps."""

    name = "model"

    def __init__(self, engine: Engine, target_vocab: int):
        if engine.args.vocab_size != target_vocab:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"the draft {engine.checkpoint.path.name} has a vocabulary of {engine.args.vocab_size} tokens but the "
                f"target has {target_vocab}: a draft must share the target's tokenizer")
        self.engine = engine
        self.max_len, self.cache = 0, None
        self.fed: list[int] = []   # tokens whose keys the cache holds, positions 0..len-1

    def start(self, max_len: int) -> None:
        self.max_len = min(max_len, self.engine.context_length)
        self.cache = self.engine.new_cache(1, self.max_len)
        self.fed = []

    def propose(self, history: list[int], k: int) -> list[int]:
        if k < 1 or len(history) + k > self.max_len:
            return []
        common = 0
        for a, b in zip(self.fed, history):
            if a != b:
                break
            common += 1
        common = min(common, len(history) - 1)  # the last token is always fed: its logits are needed
        new = history[common:]
        ex = self.engine.executor
        tokens = torch.tensor([new], dtype=torch.long)                                  # (1, T)
        positions = torch.arange(common, len(history))[None]                            # (1, T)
        logits = ex.forward(tokens, positions, self.cache, logit_index=torch.tensor([len(new) - 1]))  # (1, V)
        self.fed = list(history)
        out = []
        while True:
            tok = int(logits[0].argmax())
            out.append(tok)
            if len(out) == k:
                break
            pos = len(self.fed)
            logits = ex.forward(torch.tensor([[tok]]), torch.tensor([[pos]]), self.cache,
                                logit_index=torch.zeros(1, dtype=torch.long))
            self.fed.append(tok)
        return out


class SpeculativeGenerator:
    """One sequence, greedy: yields [(0, token)] per token (like runtime.generation.TokenGenerator,
    several tokens per target pass). `finish(0)` stops it before its next token."""

    def __init__(self, engine: Engine, draft: Draft, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                 draft_tokens: int | str = "auto", stop_token_ids: set[int] | None = None, stats=None):
        from .generation import GenerationStats

        if not params.greedy:
            raise ValueError("speculative decoding here is greedy only (temperature 0); decode sampling plainly")
        if draft_tokens != "auto" and (not isinstance(draft_tokens, int) or draft_tokens < 1):
            raise ValueError(f"draft_tokens must be 'auto' or an integer >= 1, got {draft_tokens!r}")
        ctx = engine.context_length
        if len(prompt) == 0:
            raise ValueError("prompt 0 is empty: give at least one token")
        if len(prompt) >= ctx:
            raise ContextLengthError(
                f"prompt 0 has {len(prompt)} tokens but the model's context is {ctx}: shorten the prompt")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.engine, self.draft, self.prompt = engine, draft, list(prompt)
        self.auto = draft_tokens == "auto"
        self.k = AUTO_START if self.auto else int(draft_tokens)
        self.k_max = AUTO_MAX if self.auto else self.k
        self.stop_token_ids = stop_token_ids or set()
        self.sampler = Sampler(params, 1)
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.draft = draft.name
        self.finish_reasons: dict[int, str] = {}
        self.budget = min(max_tokens, ctx - len(prompt))
        self._requested_stop = False

    def finish(self, s: int, reason: str = "stop") -> None:
        self._requested_stop = True
        self.finish_reasons.setdefault(s, reason)

    def _emit(self, history: list[int], tok: int, generated: int) -> bool:
        """Record tok; True when the sequence ends with it."""
        history.append(tok)
        self.stats.generation_tokens += 1
        if tok in self.stop_token_ids:
            self.finish_reasons.setdefault(0, "stop")
        elif generated >= self.budget:
            self.finish_reasons.setdefault(0, "length")
        return 0 in self.finish_reasons

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        eng, st = self.engine, self.stats
        history = list(self.prompt)
        n_prompt = len(history)
        room = n_prompt + self.budget + self.k_max  # drafts may run k past the last kept token
        cache = eng.new_cache(1, min(room, eng.context_length))
        self.draft.start(cache.max_len)
        st.batch, st.prompt_tokens, st.batch_first_tokens = 1, n_prompt, 1

        t0 = time.perf_counter()
        logits = eng.executor.forward(torch.tensor([history]), torch.arange(n_prompt)[None], cache,
                                      logit_index=torch.tensor([n_prompt - 1]))         # (1, V)
        tok = self.sampler(logits, [history])[0]
        st.prompt_seconds = time.perf_counter() - t0
        t_decode = time.perf_counter()
        generated = 1
        ended = self._emit(history, tok, generated)
        st.peak_rss = peak_rss()
        yield [(0, tok)]
        while not ended and not self._requested_stop:
            pos = len(history) - 1  # the last token's position; its keys are not in the cache yet
            k = min(self.k, self.budget - generated - 1, cache.max_len - 1 - pos)  # the round adds up to k + 1
            t_draft = time.perf_counter()
            drafts = self.draft.propose(history, k) if k > 0 else []
            st.draft_seconds += time.perf_counter() - t_draft
            tokens = torch.tensor([[history[-1]] + drafts])                              # (1, 1 + k')
            positions = torch.arange(pos, pos + 1 + len(drafts))[None]                   # (1, 1 + k')
            if drafts:
                logits = eng.executor.forward(tokens, positions, cache, lone_queries=True)[0]   # (1 + k', V)
            else:  # nothing proposed: a plain decode step
                logits = eng.executor.forward(tokens, positions, cache, logit_index=torch.zeros(1, dtype=torch.long))
            st.decode_passes += 1
            st.draft_proposed += len(drafts)
            accepted = 0
            for i in range(1 + len(drafts)):
                tok = self.sampler(logits[i:i + 1], [history])[0]
                generated += 1
                ended = self._emit(history, tok, generated)
                st.generation_seconds = time.perf_counter() - t_decode
                st.peak_rss = peak_rss()
                yield [(0, tok)]
                if ended or self._requested_stop:
                    break
                if i < len(drafts) and tok == drafts[i]:
                    accepted += 1
                else:
                    break
            st.draft_accepted += accepted
            if self.auto and drafts:
                self.k = min(self.k_max, self.k + 2) if accepted == len(drafts) else max(1, accepted + 1)
