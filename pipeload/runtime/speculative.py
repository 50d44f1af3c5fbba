"""Speculative decoding: a draft proposes k tokens, the target checks all k + 1 positions
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
draft_tokens="auto", `DraftLength` picks each round's k from what this run measured: the
acceptance rate, the seconds of a draft token and of a target pass over 1 + k positions (a
streamed target's pass costs seconds and long drafts pay; a resident one's costs about a draft
step and short ones do).

Sampling (temperature > 0): standard speculative sampling (Leviathan et al. 2023; Chen et al.
2023). Draft token d, drawn from the draft's distribution q (prompt lookup: q is all on d), is
kept with probability min(1, p(d) / q(d)), p being the distribution plain sampling would draw
from at that position (runtime/sampling.py: penalty, temperature, filters); on rejection the
token is drawn from max(0, p - q) normalised (`speculative_pick`). Every emitted token then
follows p exactly; the text is not the plain run's for the same seed (the random numbers are
used differently), but the same seed gives the same text.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Iterator, Protocol, Sequence

import torch

from .engine import Engine
from .memory import peak_rss
from .sampling import Sampler, SamplingParams

AUTO_MAX = 16       # largest k "auto" chooses
AUTO_FIRST, FIRST_ROUNDS = 4, 4  # "auto" drafts this many tokens in its first rounds, to measure deep positions
EXPLORE_EVERY = 8   # with "auto", every this many rounds propose one token more than the best k (to keep measuring)
DRAFT_SEED = 0x5EED  # the draft's random numbers: the run's seed + this (same seed, same text)
PRIOR_ACCEPT, PRIOR_WEIGHT = 0.8, 2.0  # acceptance assumed before measuring (as if 2 tries at 80%)
LOOKUP_NGRAM = 3    # longest suffix prompt lookup matches (it falls back to shorter ones)
DRAFT_VOCAB = 32768  # a draft of a vocabulary over twice this proposes only its first this many ids ("auto")
WIDEN_SHARE, WIDEN_MIN_TEXT = 0.10, 20  # ... until more than this share of the answer lies outside them


class Draft(Protocol):
    name: str

    def start(self, prompt: list[int], max_len: int) -> None:
        """A new sequence of at most max_len positions begins with `prompt`."""
        ...

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `history` (fewer, or none, when it has no guess)."""
        ...

    def propose_sampled(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens drawn with `sampler`, and the distributions (k', V) they were drawn
        from (None: each token was certain, q(d) = 1)."""
        ...


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the text's last n tokens
    (n = LOOKUP_NGRAM down to 1), in the prompt or the text generated so far."""

    name = "prompt-lookup"

    def __init__(self, ngram: int = LOOKUP_NGRAM):
        if ngram < 1:
            raise ValueError(f"prompt lookup needs an n-gram of at least 1 token, got {ngram}")
        self.ngram = ngram

    def start(self, prompt: list[int], max_len: int) -> None:
        pass

    def propose(self, history: list[int], k: int) -> list[int]:
        L = len(history)
        for n in range(min(self.ngram, L - 1), 0, -1):
            tail = history[L - n:]
            for i in range(L - n - 1, -1, -1):  # latest earlier occurrence first
                if history[i:i + n] == tail:
                    return history[i + n:i + n + k]
        return []

    def propose_sampled(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], None]:
        return self.propose(history, k), None


class ModelDraft:
    """A small resident model of the target's vocabulary, decoding greedily on its own KV cache.

    It remembers the tokens its cache holds; each proposal first feeds, in one pass, whatever of
    the history it has not seen (or saw differently: rejected drafts), then k - 1 decode steps.

    `vocab`: the draft proposes only token ids below it, with an output head of that many rows
    (`_narrowed_head`); "auto": DRAFT_VOCAB for vocabularies over twice that size, None: all. The
    target checks every proposal, so this changes speed, never the text; `_widen_if_needed` goes
    back to the whole vocabulary when the answer needs ids past it."""

    name = "model"

    def __init__(self, engine: Engine, target_vocab: int, vocab: int | str | None = "auto"):
        if engine.args.vocab_size != target_vocab:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"the draft {engine.checkpoint.path.name} has a vocabulary of {engine.args.vocab_size} tokens but the "
                f"target has {target_vocab}: a draft must share the target's tokenizer")
        self.engine, self.vocab = engine, target_vocab
        self.max_len, self.cache = 0, None
        self.fed: list[int] = []   # tokens whose keys the cache holds, positions 0..len-1
        if vocab == "auto":
            vocab = DRAFT_VOCAB if target_vocab > 2 * DRAFT_VOCAB else None
        self.narrow = _narrowed_head(engine, vocab) if vocab is not None and vocab < target_vocab else None
        self.proposes_from = target_vocab if self.narrow is None else vocab
        self.prompt_len = self.counted = self.outside = 0  # answer tokens counted; those the narrowed head
                                                             # cannot propose

    def start(self, prompt: list[int], max_len: int) -> None:
        """A fresh cache, and the prompt but its last token fed (the first proposal feeds that)."""
        self.max_len = min(max_len, self.engine.context_length)
        self.cache = self.engine.new_cache(1, self.max_len)
        self.fed = list(prompt[:-1])
        self.prompt_len = self.counted = len(prompt)
        self.outside = 0
        if self.fed:
            n = len(self.fed)
            with self._head():
                self.engine.executor.forward(torch.tensor([self.fed]), torch.arange(n)[None], self.cache,
                                             logit_index=torch.tensor([n - 1]))

    def propose(self, history: list[int], k: int) -> list[int]:
        return self._run(history, k, None)[0]

    def propose_sampled(self, history: list[int], k: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        tokens, q = self._run(history, k, sampler)
        return tokens, (torch.stack(q) if q else None)

    def _run(self, history: list[int], k: int, sampler: Sampler | None) -> tuple[list[int], list[torch.Tensor]]:
        """k tokens, greedy (sampler None) or drawn with `sampler`, with their distributions."""
        self._widen_if_needed(history)
        with self._head():
            return self._draw(history, k, sampler)

    @contextlib.contextmanager
    def _head(self):
        """The narrowed output head in the draft's model while the draft runs (the engine is left
        as it was between proposals)."""
        if self.narrow is None:
            yield
            return
        module, narrow = self.narrow
        full, module.output = module.output, narrow
        try:
            yield
        finally:
            module.output = full

    def _draw(self, history: list[int], k: int, sampler: Sampler | None) -> tuple[list[int], list[torch.Tensor]]:
        if k < 1 or len(history) + k > self.max_len:
            return [], []
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
        logits = ex.forward(tokens, positions, self.cache, logit_index=torch.tensor([len(new) - 1]))  # (1, V')
        self.fed = list(history)
        out, dists = [], []
        while True:
            if sampler is None:
                tok = int(logits[0].argmax())
            else:
                q = sampler.probs(self._padded(logits), [self.fed])[0]                  # (V,)
                tok = int(torch.multinomial(q, 1, generator=sampler.generators[0]))
                dists.append(q)
            out.append(tok)
            if len(out) == k:
                break
            pos = len(self.fed)
            logits = ex.forward(torch.tensor([[tok]]), torch.tensor([[pos]]), self.cache,
                                logit_index=torch.zeros(1, dtype=torch.long))
            self.fed.append(tok)
        return out, dists

    def _widen_if_needed(self, history: list[int]) -> None:
        """Count the tokens of the answer so far (history past the prompt; it only grows) that the
        narrowed head cannot propose; past WIDEN_SHARE of it (of WIDEN_MIN_TEXT tokens at least),
        propose from the whole vocabulary from now on: the answer is not in a text the first ids
        cover. (Measured on Qwen2.5-Coder answers: 2-3% of English code and prose lies past id
        32768, 25% of German, 70% of Chinese. The prompt is not counted: a chat template's
        special tokens lie past it too.)"""
        if self.narrow is None:
            return
        n = self.proposes_from
        self.outside += sum(1 for t in history[self.counted:] if t >= n)
        self.counted = len(history)
        if self.outside > WIDEN_SHARE * max(len(history) - self.prompt_len, WIDEN_MIN_TEXT):
            self.narrow, self.proposes_from = None, self.vocab

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, V') of the ids the draft proposes from, as (1, V) with -inf for the rest (their
        probability under the draft is 0, as speculative sampling's q needs)."""
        if logits.shape[-1] == self.vocab:
            return logits
        return torch.cat([logits, logits.new_full((logits.shape[0], self.vocab - logits.shape[-1]), -torch.inf)], -1)


def _narrowed_head(engine: Engine, n: int):
    """An output linear for the draft's head that computes only the logits of token ids 0..n-1:
    a view of the first n rows of its output matrix (no copy; the rows of a matrix are contiguous
    in a GGUF file). Byte-pair vocabularies number their tokens in merge order, so the first ids
    are the common ones, and the head — in a small model a large share of the bytes read per
    token (Qwen2.5-0.5B: 145 MB of 500) — shrinks with them. Returns (head module, the narrowed
    linear), or None when the head is not a plain resident linear."""
    import copy

    from ..models.common import Linear
    from ..quant.ops import GGMLWeight

    module = engine.executor.layers.acquire_head()
    try:
        full = getattr(module, "output", None)
        if not isinstance(full, Linear) or full.weight is None or not isinstance(full.weight.blocks, torch.Tensor):
            return None
        w = full.weight
        narrow = copy.copy(full)
        narrow.weight = GGMLWeight(w.qtype, (n, w.shape[1]), w.blocks[:n], w.name)
        narrow.out_features = n
        if full.bias is not None:
            narrow.bias = full.bias[:n]
        return module, narrow
    finally:
        engine.executor.layers.release_head()


def verification_logits(engine: Engine, cache, last_token: int, drafts: list[int], pos: int) -> torch.Tensor:
    """Logits (1 + k, V) of the target at the last token (position pos, not yet in the cache) and
    the k drafts after it, in one pass over its weights, each with the bits of its lone decode
    step (`lone_queries`). The cache gains their keys; rejected ones are simply overwritten."""
    tokens = torch.tensor([[last_token] + drafts])                # (1, 1 + k)
    positions = torch.arange(pos, pos + 1 + len(drafts))[None]    # (1, 1 + k)
    return engine.executor.forward(tokens, positions, cache, lone_queries=True)[0]


def speculative_pick(p: torch.Tensor, d: int, q: torch.Tensor | None, generator: torch.Generator) -> tuple[int, bool]:
    """(token, accepted) at one verified position: draft token d kept with probability
    min(1, p(d) / q(d)), else a token drawn from max(0, p - q) normalised. p, q: (V,)
    distributions of the target and the draft (q None: the draft was certain of d)."""
    qd = float(q[d]) if q is not None else 1.0
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u * qd < float(p[d]):
        return d, True
    if q is not None:
        residual = (p.double() - q.double()).clamp_min(0.0)
    else:
        residual = p.double().clone()
        residual[d] = 0.0
    total = float(residual.sum())
    if total <= 0.0:  # p <= q everywhere (p == q up to rounding): rejection had probability ~0
        residual, total = p.double(), float(p.sum())
    return int(torch.multinomial(residual / total, 1, generator=generator)), False


def check_draft_tokens(draft_tokens) -> None:
    """Raise ValueError unless draft_tokens is "auto" or an integer >= 1."""
    if draft_tokens != "auto" and (isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int)
                                   or draft_tokens < 1):
        raise ValueError(f"draft_tokens must be 'auto' or an integer >= 1, got {draft_tokens!r}")


def check_draft_vocab(draft_vocab) -> None:
    if not (draft_vocab in ("auto", None) or (isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool)
                                              and draft_vocab >= 1)):
        raise ValueError(f"draft_vocab must be 'auto', None (the whole vocabulary) or an integer >= 1, "
                         f"got {draft_vocab!r}")


class DraftLength:
    """k for the next round, from measured acceptance and costs: the k in 0..k_max that maximises
    expected tokens per second, E(k) / (k * draft_token_s + pass_s(1 + k)). A round keeps
    E(k) = 1 + sum_j prod_{i<=j} a_i tokens, a_i being the measured rate at which draft token i is
    accepted once tokens 1..i-1 were (acceptance runs in streaks, so one rate for all would
    underrate long drafts); a target pass over T positions costs pass_s(1) + slope * (T - 1),
    both fitted to this run's passes. Every EXPLORE_EVERY rounds k is one more than the best, so
    that longer drafts keep being measured."""

    def __init__(self, k_max: int = AUTO_MAX):
        self.k_max = k_max
        self.tried = [0] * (k_max + 1)     # tried[i]: rounds in which draft token i was checked
        self.kept = [0] * (k_max + 1)      # kept[i]: ... and accepted
        self.draft_s = self.draft_n = 0.0
        self.pass_s: dict[int, float] = {}  # T -> running mean seconds of a target pass over T positions
        self.pass_n: dict[int, int] = {}
        self.rounds = 0

    def record(self, proposed: int, accepted: int, draft_seconds: float, pass_seconds: float) -> None:
        for i in range(1, min(proposed, accepted + 1) + 1):
            self.tried[i] += 1
            self.kept[i] += i <= accepted
        if proposed:
            self.draft_s += draft_seconds
            self.draft_n += proposed
        T = 1 + proposed
        n = self.pass_n.get(T, 0) + 1
        self.pass_n[T] = n
        self.pass_s[T] = self.pass_s.get(T, 0.0) + (pass_seconds - self.pass_s.get(T, 0.0)) / n

    def expected_tokens(self, k: int) -> float:
        """Tokens a round with k draft tokens keeps, by the measured rates (smoothed by the prior;
        a position not measured yet takes the rate of the one before)."""
        total, run, a = 1.0, 1.0, PRIOR_ACCEPT
        for i in range(1, k + 1):
            if self.tried[i]:
                a = (self.kept[i] + PRIOR_ACCEPT * PRIOR_WEIGHT) / (self.tried[i] + PRIOR_WEIGHT)
            run *= a
            total += run
        return total

    def next(self) -> int:
        if 1 not in self.pass_s:  # measure a plain decode pass first
            return 0
        if self.tried[1] < FIRST_ROUNDS:
            return min(AUTO_FIRST, self.k_max)
        d = self.draft_s / self.draft_n if self.draft_n else 0.0
        base = self.pass_s[1]
        slopes = [(t - base) / (T - 1) for T, t in self.pass_s.items() if T > 1]
        slope = max(sum(slopes) / len(slopes), 0.0) if slopes else 0.1 * base
        best = max(range(self.k_max + 1), key=lambda k: self.expected_tokens(k) / (k * d + base + slope * k))
        self.rounds += 1
        return min(best + 1, self.k_max) if self.rounds % EXPLORE_EVERY == 0 else best


class SpeculativeGenerator:
    """One sequence: yields [(0, token)] per token (like runtime.generation.TokenGenerator, several
    tokens per target pass). `finish(0)` stops it before its next token."""

    def __init__(self, engine: Engine, draft: Draft, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                 draft_tokens: int | str = "auto", stop_token_ids: set[int] | None = None, stats=None):
        from .generation import GenerationStats, check_prompts

        check_draft_tokens(draft_tokens)
        ctx = engine.context_length
        check_prompts([prompt], max_tokens, ctx)
        self.engine, self.draft, self.prompt = engine, draft, list(prompt)
        self.length = DraftLength() if draft_tokens == "auto" else None
        self.k_max = AUTO_MAX if self.length is not None else int(draft_tokens)
        self.stop_token_ids = stop_token_ids or set()
        self.sampler = Sampler(params, 1)
        self.draft_sampler = None if params.greedy else Sampler(replace(params, seed=self.sampler.seed + DRAFT_SEED), 1)
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
        st.batch, st.prompt_tokens, st.batch_first_tokens = 1, n_prompt, 1

        t0 = time.perf_counter()
        self.draft.start(history, cache.max_len)  # a draft model's prompt pass: part of the prompt's time
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
            k = self.length.next() if self.length is not None else self.k_max
            k = min(k, self.budget - generated - 1, cache.max_len - 1 - pos)  # the round adds up to k + 1
            t_draft = time.perf_counter()
            q = None
            if k <= 0:
                drafts = []
            elif self.draft_sampler is None:
                drafts = self.draft.propose(history, k)
            else:
                drafts, q = self.draft.propose_sampled(history, k, self.draft_sampler)
            t_pass = time.perf_counter()
            draft_seconds = t_pass - t_draft
            st.draft_seconds += draft_seconds
            if drafts:
                logits = verification_logits(eng, cache, history[-1], drafts, pos)          # (1 + k', V)
            else:  # nothing proposed: a plain decode step
                logits = eng.executor.forward(torch.tensor([[history[-1]]]), torch.tensor([[pos]]), cache,
                                              logit_index=torch.zeros(1, dtype=torch.long))
            pass_seconds = time.perf_counter() - t_pass
            st.decode_passes += 1
            st.draft_proposed += len(drafts)
            accepted = 0
            for i in range(1 + len(drafts)):
                if self.draft_sampler is None or i == len(drafts):
                    tok = self.sampler(logits[i:i + 1], [history])[0]
                else:  # speculative sampling: keep drafts[i] with min(1, p/q), else draw from max(0, p - q)
                    p = self.sampler.probs(logits[i:i + 1], [history])[0]
                    tok, _ = speculative_pick(p, drafts[i], q[i] if q is not None else None,
                                              self.sampler.generators[0])
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
            if self.length is not None:
                self.length.record(len(drafts), accepted, draft_seconds, pass_seconds)
