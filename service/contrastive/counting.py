"""The counting rule: the prompt's counted noun phrase re-counted by ±1 and ±2.

"an airplane" → "two airplanes", "three airplanes"; "3 cats" → "1 cat", "2 cats", "4 cats",
"5 cats". Counts never go below one, the number style (digits or words) and case are kept,
and only the count phrase is rewritten: the rest of the prompt is copied as it is.
"""

from __future__ import annotations

from service.contrastive.phrases import find_count_phrase, render_phrase
from service.contrastive.tokens import tokenize


def counting_candidates(prompt: str) -> list[str]:
    """Re-counted prompts, before dedupe; empty when the prompt has no count phrase."""
    phrase = find_count_phrase(prompt, tokenize(prompt))
    if phrase is None:
        return []
    before, after = prompt[: phrase.start], prompt[phrase.end :]
    return [
        before + render_phrase(prompt, phrase, count) + after
        for count in _neighbour_counts(phrase.count)
    ]


def _neighbour_counts(count: int) -> list[int]:
    return [c for c in (count - 2, count - 1, count + 1, count + 2) if c >= 1]
