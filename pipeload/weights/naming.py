"""Renaming checkpoint tensors to the GGUF names pipeload's modules carry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NameRule:
    """A checkpoint name pattern, its GGUF name (None: drop the tensor), and a transform.

    transform: None, or "transpose" for Conv1D-style (in, out) weights stored transposed.
    """

    pattern: str
    target: str | None
    transform: str | None = None
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "regex", re.compile(self.pattern))


def rename(name: str, rules: list[NameRule]) -> tuple[str | None, str | None] | None:
    """(GGUF name or None to drop, transform) for a checkpoint name, or None if no rule matches."""
    for rule in rules:
        m = rule.regex.fullmatch(name)
        if m:
            return (m.expand(rule.target) if rule.target is not None else None), rule.transform
    return None
