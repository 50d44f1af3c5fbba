"""One sequence's tokens -> its text, as a stream of deltas (the "sampler -> text" step of docs/DESIGN.md).

Used by `stream_generate` (runtime/generation.py) and the continuous-batching scheduler
(runtime/scheduler.py), so that a request's text is the same whichever way it ran:

- tokens are detokenized incrementally (a delta is only text that can no longer change: a
  multi-byte character split across tokens waits for its last byte);
- a token that ends generation (EOS, end of turn) adds no text;
- stop strings end the sequence where they start (the stop string itself is not sent), and the
  tail of the text that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could start a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """The text of one sequence, delta by delta; `tokenizer` None gives empty text."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded so far
        self.sent = 0   # characters of it already streamed

    def add(self, token: int, reason: str | None, ends_generation: bool = False) -> tuple[str, str | None]:
        """(text that became final, finish reason) after `token`. `reason` is the sequence's
        finish reason so far ("stop", "length" or None); `ends_generation` says the token is a
        stop token (it adds no text). A stop string found in the text makes the reason "stop"."""
        if self.detok is not None:
            if not ends_generation:
                self.text += self.detok.add(token)
            if reason is not None:
                self.text += self.detok.finish()
        end = len(self.text)
        if self.stop:
            found = (self.text.find(x, max(0, self.sent - len(x))) for x in self.stop)
            hit = min((i for i in found if i >= 0), default=-1)
            if hit >= 0:
                end, reason = hit, "stop"
            elif reason is None:
                end -= held_back(self.text, self.stop)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta, reason
