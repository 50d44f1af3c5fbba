"""Renaming checkpoint tensors to the GGUF names pipeload's modules carry.

Architectures declare their rules as plain data (models/*.py `HF_NAME_RULES`): tuples of
(regex over the checkpoint name, GGUF name or None to drop the tensor[, transform]), where the
transform is None or "transpose" (Conv1D-style (in, out) weights stored transposed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NameRule:
    """One compiled rule: a checkpoint name pattern, its GGUF name (None: drop), a transform."""

    pattern: str
    target: str | None
    transform: str | None = None
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.transform not in (None, "transpose"):
            raise ValueError(f"name rule {self.pattern!r}: unknown transform {self.transform!r}")
        object.__setattr__(self, "regex", re.compile(self.pattern))


def compile_rules(rules) -> list[NameRule]:
    """NameRules of an architecture's plain-data rules (tuples of 2 or 3 items)."""
    return [rule if isinstance(rule, NameRule) else NameRule(*rule) for rule in rules or []]


def rename(name: str, rules: list[NameRule]) -> tuple[str | None, str | None] | None:
    """(GGUF name or None to drop, transform) for a checkpoint name, or None if no rule matches."""
    for rule in rules:
        m = rule.regex.fullmatch(name)
        if m:
            return (m.expand(rule.target) if rule.target is not None else None), rule.transform
    return None
