"""Continuous batching: many requests share each pass over the weights of one model.

A `Scheduler` owns one Engine and one KV cache of `max_batch` slots. Requests wait in a FIFO
queue; each `step()` is one pass over the weights, either

- a prefill pass: waiting requests (as many as there are free slots, up to a token budget) run
  their whole prompts in one pass over the weights, right-padded, into free slots, and get their
  first token; or
- a decode pass: every active sequence advances by one token.

After a prefill pass the next step is always a decode pass, so new arrivals cannot starve the
running batch; a request that arrives while the model is decoding joins the batch one pass
later. Finished and cancelled sequences leave at once and their slot is reused. Active
sequences are kept packed in rows 0..n-1 of the cache (a leaving sequence's row is filled by
moving the last one), so a decode pass computes exactly n rows.

Each request has its own SamplingParams and Sampler (seeded as a lone run's), stop strings,
EOS ids and max_tokens, and is turned into text with the same rules as `stream_generate`. With
`exact=True` (the default) every pass tells the executor each sequence's rows (RowSpan), and the
executor gives each sequence the bits of its lone run (runtime/executor.py: prefills sequence by
sequence within each layer, decode attention per row, linears row-exact up to ops.EXACT_ROWS
rows, which caps max_batch), so a request's tokens and logits are bit-for-bit those of a lone
run of `PipelineModel.stream` whatever else shares the batch. With exact=False a pass treats
the batch as one (padded prompts share attention kernels; tokens may then part from a lone
run's at near-ties).

Speculative decoding (`draft`: a runtime.speculative ModelDraft or PromptLookup): when one greedy
sequence runs alone and nothing waits, a decode pass becomes a speculative round: the draft
proposes k tokens and one pass over the target's weights checks all k + 1 positions with
`lone_queries`, so the tokens are the plain run's, token for token, and several come from one
pass. As soon as a second request arrives the batch decodes plainly again. Sampled requests
always decode plainly: speculative sampling follows the same distribution but not the same text
for a seed, and a request's text must not depend on whether it ran alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import ContextLengthError, NoTokenizerError
from ..models.common import RowSpan
from ..quant import ops
from .engine import Engine
from .sampling import Sampler, SamplingParams
from .textstream import TextStream


@dataclass
class Request:
    """One generation request: prompt token ids and how to sample and stop."""

    id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None            # None: until the slot's context is full
    stop: Sequence[str] = ()                 # stop strings (need a tokenizer)
    stop_token_ids: frozenset[int] = frozenset()  # usually the tokenizer's EOS ids
    logprobs: int | None = None              # report the sampled token's logprob and the top k (None: off)


@dataclass
class Event:
    """One streamed update of one request (like GenerationResponse, keyed by request id)."""

    request_id: str
    text: str                      # text that became final with this update
    token: int | None              # token sampled in this step
    finish_reason: str | None      # "stop", "length" or None while running
    prompt_tokens: int
    completion_tokens: int         # tokens generated so far (an EOS token counts)
    logprob: float | None = None   # log-probability of `token` under the model (logprobs requested)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), best first


class _Sequence:
    """Running state of one admitted request."""

    def __init__(self, req: Request, budget: int, tokenizer):
        self.req, self.budget = req, budget
        self.sampler = Sampler(req.params, 1)
        self.history = list(req.prompt)  # prompt + generated tokens
        self.generated = 0
        self.text = TextStream(tokenizer, req.stop)
        self.draft_length = None  # runtime.speculative.DraftLength once this sequence speculates

    @property
    def written(self) -> int:
        """Positions of this sequence already in the KV cache (all tokens but the last sampled)."""
        return len(self.history) - 1


class Scheduler:
    """Slot-based continuous batching over one engine; see the module docstring.

    `max_len` caps each slot's context (default: the model's); the KV cache holds
    max_batch * max_len positions. With exact=True, max_batch is at most ops.EXACT_ROWS (the
    rows up to which every row of a product is computed as alone). Not thread-safe: one thread
    calls submit/cancel/step.
    """

    def __init__(self, engine: Engine, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 exact: bool = True, max_prefill_tokens: int = 2048, draft=None, draft_tokens: int | str = "auto"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if exact:
            max_batch = min(max_batch, ops.EXACT_ROWS)
        self.engine, self.tokenizer, self.max_batch, self.exact = engine, tokenizer, max_batch, exact
        self.max_len = min(max_len or engine.context_length, engine.context_length)
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = engine.new_cache(max_batch, self.max_len)
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []  # row r of the cache holds active[r]
        self._ids: set[str] = set()
        self._prefilled_last = False
        self.counters = {"prefill_passes": 0, "decode_passes": 0, "prompt_tokens": 0, "generated_tokens": 0,
                         "cancelled": 0, "finished": 0, "speculative_passes": 0, "draft_proposed": 0,
                         "draft_accepted": 0}
        from .speculative import check_draft_tokens

        check_draft_tokens(draft_tokens)
        self.draft, self.draft_tokens = draft, draft_tokens
        self._draft_for: _Sequence | None = None  # the sequence the draft's state follows
        self.last_batch = 0  # sequences in the last pass
        self.last_step_seconds = 0.0

    # -- requests -----------------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        """Raise ValueError / ContextLengthError / NoTokenizerError if `req` cannot run here."""
        if not req.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.engine.args.vocab_size
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(req.prompt) >= self.max_len:
            raise ContextLengthError(f"the prompt has {len(req.prompt)} tokens but the context is {self.max_len} "
                                     "tokens: shorten the prompt")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if any(req.stop) and self.tokenizer is None:
            raise NoTokenizerError("stop strings need a tokenizer, and this model has none")
        if req.id in self._ids:
            raise ValueError(f"request id {req.id!r} is already in use")

    def submit(self, req: Request) -> None:
        """Queue a request; it starts at the next prefill pass. Raises as `validate` does."""
        self.validate(req)
        self._ids.add(req.id)
        self.waiting.append(req)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request at once (its slot is free for the next pass).

        Returns False if the id is unknown (e.g. it already finished)."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                self._ids.discard(request_id)
                self.counters["cancelled"] += 1
                return True
        for r, seq in enumerate(self.active):
            if seq.req.id == request_id:
                self._free([r])
                self.counters["cancelled"] += 1
                return True
        return False

    @property
    def busy(self) -> bool:
        """True while some request is waiting or running."""
        return bool(self.waiting or self.active)

    # -- passes -------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Run one pass over the weights (prefill of new requests, or one decode step of all).

        Returns one Event per sequence that advanced; empty if there is nothing to do."""
        t0 = time.perf_counter()
        free = self.max_batch - len(self.active)
        if self.waiting and free and not (self._prefilled_last and self.active):
            events = self._prefill(self._admit(free))
            self._prefilled_last = True
        elif self.active:
            events = self._speculate() if self._may_speculate() else self._decode()
            self._prefilled_last = False
        else:
            return []
        self.last_step_seconds = time.perf_counter() - t0
        return events

    def _admit(self, free: int) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        tokens = 0
        while self.waiting and len(admitted) < free:
            n = len(self.waiting[0].prompt)
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            req = self.waiting.popleft()
            budget = self.max_len - n if req.max_tokens is None else min(req.max_tokens, self.max_len - n)
            admitted.append(_Sequence(req, budget, self.tokenizer))
            tokens += n
        return admitted

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, first_row: int, logit_index: torch.Tensor,
                 rows: list[RowSpan]) -> torch.Tensor:
        """Logits (B, V) of one pass over cache rows first_row.. (rows: each sequence's new tokens)."""
        cache = self.cache.rows(first_row, first_row + tokens.shape[0])
        exact = rows if self.exact and len(rows) > 1 else None  # one sequence alone is its lone run already
        return self.engine.executor.forward(tokens, positions, cache, logit_index=logit_index, rows=exact)

    def _prefill(self, seqs: list[_Sequence]) -> list[Event]:
        lens = [len(s.history) for s in seqs]
        T = max(lens)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)  # (k, T), right-padded
        for b, s in enumerate(seqs):
            tokens[b, :lens[b]] = torch.tensor(s.history)
        positions = torch.arange(T).expand(len(seqs), T)      # (k, T)
        first_row = len(self.active)
        self.active.extend(seqs)
        logits = self._forward(tokens, positions, first_row, torch.tensor(lens) - 1, [RowSpan(0, n) for n in lens])
        self.counters["prefill_passes"] += 1
        self.counters["prompt_tokens"] += sum(lens)
        return self._sample(logits, first_row)

    def _decode(self) -> list[Event]:
        seqs = self.active
        tokens = torch.tensor([[s.history[-1]] for s in seqs])  # (n, 1)
        positions = torch.tensor([[s.written] for s in seqs])    # (n, 1)
        logits = self._forward(tokens, positions, 0, torch.zeros(len(seqs), dtype=torch.long),
                               [RowSpan(s.written, 1) for s in seqs])
        self.counters["decode_passes"] += 1
        return self._sample(logits, 0)

    def _may_speculate(self) -> bool:
        return (self.draft is not None and len(self.active) == 1 and not self.waiting
                and self.active[0].req.params.greedy)

    def _speculate(self) -> list[Event]:
        """One speculative round for the lone greedy sequence: the draft's k tokens and the last
        one checked in one pass; the tokens up to the first disagreement, and the target's own
        token there, are emitted (at least one token, as a decode pass)."""
        from .speculative import DraftLength, verification_logits

        seq = self.active[0]
        if self._draft_for is not seq:
            self.draft.start(seq.history, self.max_len)
            self._draft_for = seq
        if seq.draft_length is None and self.draft_tokens == "auto":
            seq.draft_length = DraftLength()
        pos = seq.written
        k = seq.draft_length.next() if seq.draft_length is not None else int(self.draft_tokens)
        k = min(k, seq.budget - seq.generated - 1, self.max_len - 1 - pos)  # the round adds up to k + 1
        t0 = time.perf_counter()
        drafts = self.draft.propose(seq.history, k) if k > 0 else []
        t1 = time.perf_counter()
        if not drafts:
            events = self._decode()
            if seq.draft_length is not None:  # a plain pass: what a round without drafts costs
                seq.draft_length.record(0, 0, 0.0, time.perf_counter() - t1)
            return events
        logits = verification_logits(self.engine, self.cache.rows(0, 1), seq.history[-1], drafts, pos)
        self.counters["decode_passes"] += 1
        self.counters["speculative_passes"] += 1
        self.counters["draft_proposed"] += len(drafts)
        self.last_batch = 1
        events, accepted = [], 0
        for i in range(1 + len(drafts)):
            events.append(self._advance(seq, logits[i:i + 1]))
            if events[-1].finish_reason is not None or i == len(drafts) or events[-1].token != drafts[i]:
                break
            accepted += 1
        self.counters["draft_accepted"] += accepted
        if seq.draft_length is not None:
            seq.draft_length.record(len(drafts), accepted, t1 - t0, time.perf_counter() - t1)
        self._account(events, [0] if events[-1].finish_reason is not None else [])
        return events

    def _advance(self, seq: _Sequence, row: torch.Tensor) -> Event:
        """Sample seq's next token from its logits row (1, V) and turn it into an event."""
        tok = seq.sampler(row, [seq.history])[0]
        seq.history.append(tok)
        seq.generated += 1
        event = self._text_event(seq, tok)
        if seq.req.logprobs is not None:
            lp = torch.log_softmax(row[0].float(), -1)  # (V,)
            event.logprob = float(lp[tok])
            if seq.req.logprobs > 0:
                top = torch.topk(lp, min(seq.req.logprobs, lp.shape[0]))
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        return event

    def _sample(self, logits: torch.Tensor, first_row: int) -> list[Event]:
        """Sample a token for rows first_row.. from logits (k, V); emit events; free finished rows."""
        self.last_batch = logits.shape[0]
        events, finished = [], []
        for i in range(logits.shape[0]):
            r = first_row + i
            event = self._advance(self.active[r], logits[i:i + 1])
            events.append(event)
            if event.finish_reason is not None:
                finished.append(r)
        self._account(events, finished)
        return events

    def _account(self, events: list[Event], finished: list[int]) -> None:
        """Count a pass's tokens and finished sequences; free the finished rows."""
        self.counters["generated_tokens"] += len(events)
        self.counters["finished"] += len(finished)
        self._free(finished)

    def _text_event(self, seq: _Sequence, tok: int) -> Event:
        """The text delta and finish reason after `tok` (runtime/textstream.py, as stream_generate)."""
        ends = tok in seq.req.stop_token_ids
        reason = "stop" if ends else "length" if seq.generated >= seq.budget else None
        delta, reason = seq.text.add(tok, reason, ends_generation=ends)
        return Event(request_id=seq.req.id, text=delta, token=tok, finish_reason=reason,
                     prompt_tokens=len(seq.req.prompt), completion_tokens=seq.generated)

    def _free(self, rows: list[int]) -> None:
        """Remove active rows, filling each hole with the last active sequence (its KV moved)."""
        for r in sorted(rows, reverse=True):
            last = len(self.active) - 1
            self._ids.discard(self.active[r].req.id)
            if self.active[r] is self._draft_for:
                self._draft_for = None
            if r != last:
                self.cache.move_row(last, r, self.active[last].written + 1)
                self.active[r] = self.active.pop()
            else:
                self.active.pop()
