"""Word tokens of a prompt, with their character spans, and small word utilities.

Every generator rewrites only the words it changes, so it needs to know where each word sits in
the original string. A token is a word (inner hyphens and apostrophes kept: "teddy-bear",
"cat's") or a decimal number ("3.5", kept whole so its parts are never read as counts). Two
tokens are adjacent when only whitespace, and no punctuation, separates them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’-]\w+)*")


@dataclass(frozen=True)
class Token:
    """One word of a prompt and its span ``text[start:end]``."""

    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower()


def tokenize(text: str) -> list[Token]:
    """The word tokens of `text`, in order."""
    return [Token(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


def adjacent(text: str, left: Token, right: Token) -> bool:
    """True when only whitespace (no punctuation) separates two tokens."""
    gap = text[left.end : right.start]
    return gap != "" and gap.isspace()


def next_adjacent(text: str, tokens: Sequence[Token], index: int) -> Token | None:
    """The token right after `index` when it is adjacent to it, else None."""
    if index + 1 >= len(tokens) or not adjacent(text, tokens[index], tokens[index + 1]):
        return None
    return tokens[index + 1]


def match_case(word: str, template: str) -> str:
    """`word` in the case style of `template` ("Two" → "Three", "CATS" → "DOGS")."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def word_set(text: str) -> frozenset[str]:
    """The set of space-separated words in `text`."""
    return frozenset(text.split())
