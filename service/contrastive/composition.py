"""The composition rule, for prompts of the form "<NP1> and <NP2>[ trailing context]".

Both noun phrases must be count phrases joined by "and" (", and" allowed). The contrastive set
is each object alone, then every count combination up to COMPOSITION_MAX_COUNT of each (except
the prompt's own), then the "X-like Y" and "Y-like X" blends. Text before the first phrase and
after the second is kept as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.contrastive.inflection import article
from service.contrastive.phrases import (
    CountPhrase,
    any_count_phrase_at,
    render_phrase,
    singular_noun_phrase,
)
from service.contrastive.tokens import Token, match_case, next_adjacent, tokenize

COMPOSITION_MAX_COUNT = 3


def composition_candidates(prompt: str) -> list[str]:
    """Composition prompts, before dedupe; empty when the prompt is not "<NP1> and <NP2>"."""
    found = find_composition(prompt, tokenize(prompt))
    if found is None:
        return []
    first, second = found
    before, after = prompt[: first.start], prompt[second.end :]
    separator = prompt[first.end : second.start]
    case = first.count_word.text
    outputs = [
        before + render_phrase(prompt, first, first.count) + after,
        before + render_phrase(prompt, second, second.count, case_template=case) + after,
    ]
    counts = range(1, COMPOSITION_MAX_COUNT + 1)
    for i in counts:
        for j in counts:
            if (i, j) == (first.count, second.count):
                continue
            pair = render_phrase(prompt, first, i) + separator
            outputs.append(before + pair + render_phrase(prompt, second, j) + after)
    x, y = singular_noun_phrase(prompt, first), singular_noun_phrase(prompt, second)
    for left, right in ((x, y), (y, x)):
        blend_article = match_case(article(left), case)
        outputs.append(f"{before}{blend_article} {left}-like {right}{after}")
    return outputs


def find_composition(text: str, tokens: Sequence[Token]) -> tuple[CountPhrase, CountPhrase] | None:
    """The first two count phrases joined by "and", if any."""
    for index in range(len(tokens)):
        first = any_count_phrase_at(text, tokens, index)
        if first is None:
            continue
        second_index = _joined_by_and(text, tokens, first)
        if second_index is None:
            continue
        second = any_count_phrase_at(text, tokens, second_index)
        if second is not None:
            return first, second
    return None


def _joined_by_and(text: str, tokens: Sequence[Token], first: CountPhrase) -> int | None:
    """Token index right after an "and" that follows `first` (", and" allowed), if any."""
    and_index = first.index + len(first.words) + 1
    if and_index >= len(tokens) or tokens[and_index].lower != "and":
        return None
    if text[first.end : tokens[and_index].start].strip() not in ("", ","):
        return None
    if next_adjacent(text, tokens, and_index) is None:
        return None
    return and_index + 1
