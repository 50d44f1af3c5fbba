"""Generation in three layers: token steps -> a stream of responses -> the plain string.

`TokenGenerator` runs the prompt through the model in one pass (all prompts of a batch together,
right-padded), keeps the KV cache, and yields the sampled tokens step by step. `stream_generate`
turns those into text deltas (runtime/textstream.py: stop strings, hold-back) with finish
reasons and running figures;
`PipelineModel.generate` joins a stream into strings. The CLI, the server and the benchmarks consume the
stream; none of them re-implements it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import ContextLengthError, NoTokenizerError
from .engine import Engine
from .memory import peak_rss
from .sampling import Sampler, SamplingParams
from .textstream import TextStream


@dataclass
class GenerationStats:
    """Figures of one generation run (all sequences of a batch together)."""

    batch: int = 1
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0  # decode passes only: the first token comes from the prompt pass
    decode_passes: int = 0
    peak_rss: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decoded_tokens(self) -> int:
        """Tokens the decode passes produced (the first of each sequence comes from the prompt pass)."""
        return self.generation_tokens - self.batch_first_tokens

    @property
    def generation_tps(self) -> float:
        """Tokens per second of the decode passes (tokens they produced / their time)."""
        return self.decoded_tokens / self.generation_seconds if self.generation_seconds else 0.0

    batch_first_tokens: int = 0  # tokens sampled from the prompt pass's logits
    draft: str | None = None     # speculative decoding (runtime/speculative.py): "model" or "prompt-lookup"
    draft_proposed: int = 0      # draft tokens the target checked
    draft_accepted: int = 0      # of those, the ones it kept
    draft_seconds: float = 0.0   # time spent proposing (part of generation_seconds)

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per decode pass over the target's weights (1 without speculation, batch 1)."""
        return self.decoded_tokens / self.decode_passes if self.decode_passes else 0.0

    def as_dict(self) -> dict:
        spec = {} if self.draft is None else {
            "draft": self.draft, "draft_proposed": self.draft_proposed, "draft_accepted": self.draft_accepted,
            "acceptance_rate": self.acceptance_rate, "draft_seconds": self.draft_seconds}
        return {**spec, "decode_passes": self.decode_passes, "tokens_per_pass": self.tokens_per_pass,
                "batch": self.batch, "prompt_tokens": self.prompt_tokens, "prompt_seconds": self.prompt_seconds,
                "prompt_tps": self.prompt_tps, "generation_tokens": self.generation_tokens,
                "generation_seconds": self.generation_seconds, "generation_tps": self.generation_tps,
                "peak_rss": self.peak_rss}


def check_prompts(prompts: Sequence[Sequence[int]], max_tokens: int, ctx: int) -> None:
    """Raise ValueError / ContextLengthError for an empty prompt, one that fills the context `ctx`,
    or max_tokens < 1 (TokenGenerator and runtime/speculative.py SpeculativeGenerator)."""
    for s, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {s} is empty: give at least one token")
        if len(p) >= ctx:
            raise ContextLengthError(
                f"prompt {s} has {len(p)} tokens but the context is {ctx} positions: shorten the prompt, "
                f"or load the model with a larger ctx (a memory budget sizes it when none is given)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")


class TokenGenerator:
    """Yields, per step, [(sequence index, token id)] for every still-running sequence.

    A sequence ends when it samples a stop token, reaches max_tokens or the context, or when the
    consumer calls `finish(s)` (e.g. on a stop string).
    """

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams, max_tokens: int,
                 stop_token_ids: set[int] | None = None, stats: GenerationStats | None = None):
        check_prompts(prompts, max_tokens, engine.context_length)
        ctx = engine.context_length
        self.engine, self.prompts, self.max_tokens = engine, [list(p) for p in prompts], max_tokens
        self.stop_token_ids = stop_token_ids or set()
        self.sampler = Sampler(params, len(prompts))
        self.stats = stats if stats is not None else GenerationStats()
        self.finish_reasons: dict[int, str] = {}
        self.budget = [min(max_tokens, ctx - len(p)) for p in self.prompts]  # tokens each may generate
        self._requested_stop: set[int] = set()

    def finish(self, s: int, reason: str = "stop") -> None:
        """Stop sequence s before its next step."""
        self._requested_stop.add(s)
        self.finish_reasons.setdefault(s, reason)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        eng, st = self.engine, self.stats
        B = len(self.prompts)
        lens = [len(p) for p in self.prompts]
        T = max(lens)
        cache = eng.new_cache(B, max(l + b for l, b in zip(lens, self.budget)))
        tokens = torch.zeros(B, T, dtype=torch.long)
        for s, p in enumerate(self.prompts):
            tokens[s, :len(p)] = torch.tensor(p)
        positions = torch.arange(T).expand(B, T)
        history = [list(p) for p in self.prompts]
        st.batch, st.prompt_tokens = B, sum(lens)

        t0 = time.perf_counter()
        logits = eng.executor.forward(tokens, positions, cache, logit_index=torch.tensor(lens) - 1)  # (B, V)
        active = list(range(B))  # sequence index of each cache row
        generated = [0] * B
        first = True
        t_decode = 0.0
        while True:
            next_tokens = self.sampler(logits, [history[s] for s in active], rows=active)
            now = time.perf_counter()
            if first:
                st.prompt_seconds = now - t0
                st.batch_first_tokens = len(active)
                t_decode = now
                first = False
            else:
                st.generation_seconds = now - t_decode
            step = list(zip(active, next_tokens))
            for s, tok in step:
                history[s].append(tok)
                generated[s] += 1
                if tok in self.stop_token_ids:
                    self.finish_reasons.setdefault(s, "stop")
                elif generated[s] >= self.budget[s]:
                    self.finish_reasons.setdefault(s, "length")
            st.generation_tokens += len(step)
            st.peak_rss = peak_rss()
            yield step
            keep = [r for r, s in enumerate(active) if s not in self.finish_reasons and s not in self._requested_stop]
            if not keep:
                return
            if len(keep) < len(active):
                cache.reorder(torch.tensor(keep))
                active = [active[r] for r in keep]
                next_tokens = [next_tokens[r] for r in keep]
            tok = torch.tensor(next_tokens, dtype=torch.long)[:, None]                     # (B', 1)
            pos = torch.tensor([lens[s] + generated[s] - 1 for s in active])[:, None]      # (B', 1)
            logits = eng.executor.forward(tok, pos, cache, logit_index=torch.zeros(len(active), dtype=torch.long))
            st.decode_passes += 1


@dataclass
class GenerationResponse:
    """One streamed update for one sequence."""

    text: str                      # text that became final with this update
    token: int | None              # token sampled in this step (None: final flush)
    sequence: int                  # index of the prompt in the batch
    finish_reason: str | None      # "stop", "length" or None while running
    token_ids: list[int] = field(default_factory=list)  # all tokens generated so far for this sequence
    prompt_tokens: int = 0
    generation_tokens: int = 0     # for all sequences together
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: int = 0           # peak RSS of the process, bytes


def stream_generate(engine: Engine, tokenizer, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
                    max_tokens: int = 256, stop: Sequence[str] = (), stats: GenerationStats | None = None,
                    ignore_eos: bool = False, draft=None, draft_tokens: int | str = "auto") -> Iterator[GenerationResponse]:
    """Stream GenerationResponses for each prompt (text or token ids); the last one of each sequence
    carries its finish_reason. With `draft` (runtime/speculative.py), a lone prompt is decoded
    speculatively (several tokens per target pass: greedy, the same tokens; sampled, the same
    distribution); batches decode plainly.
    Raises NoTokenizerError for text without a tokenizer."""
    if tokenizer is None and (stop or any(isinstance(p, str) for p in prompts)):
        raise NoTokenizerError("this model has no tokenizer: pass token ids, or a model folder/GGUF file "
                               "that includes one (tokenizer.json or tokenizer.ggml.* metadata)")
    stop = [s for s in stop if s]
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    stop_ids = set() if ignore_eos or tokenizer is None else set(tokenizer.eos_token_ids)
    if draft is not None and len(ids) == 1:
        from .speculative import SpeculativeGenerator

        gen = SpeculativeGenerator(engine, draft, ids[0], params, max_tokens, draft_tokens, stop_ids, stats)
    else:
        gen = TokenGenerator(engine, ids, params, max_tokens, stop_ids, stats)
    B = len(ids)
    texts = [TextStream(tokenizer, stop) for _ in range(B)]
    out_ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    for step in gen:
        st = gen.stats
        for s, tok in step:
            if done[s]:
                continue
            reason = gen.finish_reasons.get(s)
            is_eos = reason == "stop" and tok in stop_ids
            if not is_eos:
                out_ids[s].append(tok)
            delta, reason = texts[s].add(tok, reason, ends_generation=is_eos)
            if reason == "stop" and s not in gen.finish_reasons:
                gen.finish(s, "stop")  # a stop string
            if reason is not None:
                done[s] = True
            yield GenerationResponse(text=delta, token=tok, sequence=s, finish_reason=reason, token_ids=list(out_ids[s]),
                                     prompt_tokens=st.prompt_tokens, generation_tokens=st.generation_tokens,
                                     prompt_tps=st.prompt_tps, generation_tps=st.generation_tps, peak_memory=st.peak_rss)
