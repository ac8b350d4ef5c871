"""Count phrases: finding "<count word> <adjective>* <head noun>" in a prompt and re-counting it.

A count word is an explicit number (one..twelve or 1..12) or an article ("a", "an", "one"). The
noun phrase after it runs over adjacent words up to a stop word (prepositions, conjunctions,
determiners, other numbers), punctuation or a post-nominal word ("cats sitting on ..."). An
article phrase right after a preposition ("on a table") or followed by "of" ("a photo of") is
a location or container, not the counted object. :func:`render_phrase` rewrites a phrase for a
new count in the same number style, with the right article and singular/plural head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.contrastive.inflection import article, pluralize, singularize
from service.contrastive.tokens import Token, adjacent, match_case, next_adjacent, word_set

# Plain English count words, not any world's vocabulary: counts up to MAX_READ_COUNT are read
# in a prompt; the counting rule's +2 may write up to two more.
MAX_READ_COUNT = 12
NUMBER_WORDS: dict[int, str] = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
    13: "thirteen",
    14: "fourteen",
}
_DIGIT_COUNT_RE = re.compile(r"[1-9][0-9]?")
_NUMBER_VALUES: dict[str, int] = {
    word: value for value, word in NUMBER_WORDS.items() if value <= MAX_READ_COUNT
}

_ARTICLES = frozenset(("a", "an", "one"))
# An article phrase right after one of these is a location/complement, not the counted object.
_SKIP_PREPOSITIONS = word_set(
    "on in at under over behind near with beside besides above below inside into onto to "
    "by from against atop beneath underneath across along around through within without "
    "upon between among amongst outside beyond toward towards for before after past like"
)
# Words that end a noun phrase wherever they appear.
_NP_STOP_WORDS = _SKIP_PREPOSITIONS | word_set(
    "of and or but nor while so yet then than as a an the this that these those some any "
    "each every his her its their our my your is are was were be been being has have had "
    "who which whose where when it they he she we you i not no both all few dozen several "
    "many couple hundred thousand million billion more less fewer most"
)
# Before a count word these take "one" for a count of 1, not an article ("the one cat", not
# "the a cat").
_DETERMINERS = word_set(
    "the this that these those my your his her its our their all both each every some any no"
)
_WORD_BEFORE_RE = re.compile(r"([^\W\d_]+)\s+$")
# Words that end a noun phrase once it has at least one word ("cats sitting on ...").
_POSTNOMINAL_WORDS = word_set(
    "sitting standing lying laying playing running walking flying eating drinking holding "
    "wearing looking swimming jumping sleeping riding driving resting waiting hanging "
    "floating carrying facing made covered filled dressed painted placed surrounded "
    "stacked arranged lined parked together"
)


@dataclass(frozen=True)
class CountPhrase:
    """A counted noun phrase inside a prompt, by token positions."""

    index: int  # token index of the count word
    count_word: Token
    count: int
    digits: bool  # number written as digits ("3 cats")
    words: tuple[Token, ...]  # adjectives then the head noun

    @property
    def head(self) -> Token:
        return self.words[-1]

    @property
    def start(self) -> int:
        return self.count_word.start

    @property
    def end(self) -> int:
        return self.head.end


def find_count_phrase(text: str, tokens: Sequence[Token]) -> CountPhrase | None:
    """The counted phrase: the first explicit number wins, else the first article phrase."""
    for explicit in (True, False):
        for index in range(len(tokens)):
            phrase = _count_phrase_at(text, tokens, index, explicit)
            if phrase is not None:
                return phrase
    return None


def any_count_phrase_at(text: str, tokens: Sequence[Token], index: int) -> CountPhrase | None:
    """The count phrase starting at token `index`, by explicit number or else by article."""
    return _count_phrase_at(text, tokens, index, explicit=True) or _count_phrase_at(
        text, tokens, index, explicit=False
    )


def ends_noun_phrase(token: Token, has_words: bool) -> bool:
    """True when `token` cannot continue a noun phrase that has words already (or not)."""
    if token.lower in _NP_STOP_WORDS or _is_number(token):
        return True
    if not any(ch.isalpha() for ch in token.text):
        return True
    return has_words and token.lower in _POSTNOMINAL_WORDS


def render_phrase(
    text: str, phrase: CountPhrase, count: int, case_template: str | None = None
) -> str:
    """The phrase's text with `count` in place of its count, in the same number style."""
    head = _head_for_count(phrase, count)
    between = text[phrase.count_word.end : phrase.head.start]
    template = phrase.count_word.text if case_template is None else case_template
    if phrase.digits:
        number = str(count)
    elif count == 1 and _after_determiner(text, phrase):
        number = match_case("one", template)
    elif count == 1:
        first_word = head if len(phrase.words) == 1 else phrase.words[0].text
        number = match_case(article(first_word), template)
    else:
        number = match_case(NUMBER_WORDS[count], template)
    return number + between + head


def _after_determiner(text: str, phrase: CountPhrase) -> bool:
    found = _WORD_BEFORE_RE.search(text, 0, phrase.count_word.start)
    return found is not None and found.group(1).lower() in _DETERMINERS


def singular_noun_phrase(text: str, phrase: CountPhrase) -> str:
    """Adjectives plus singular head, without the count: "red circle"."""
    return text[phrase.words[0].start : phrase.head.start] + _head_for_count(phrase, 1)


def _count_phrase_at(
    text: str, tokens: Sequence[Token], index: int, explicit: bool
) -> CountPhrase | None:
    """The count phrase starting at token `index` (an explicit number or an article), if any."""
    token = tokens[index]
    if explicit:
        parsed = _explicit_count(token)
    else:
        parsed = (1, False) if token.lower in _ARTICLES else None
    if parsed is None:
        return None
    words = _noun_phrase(text, tokens, index)
    if not words:
        return None
    if not explicit and (
        _followed_by_of(text, tokens, index, words) or _after_preposition(text, tokens, index)
    ):
        return None
    return CountPhrase(index, token, parsed[0], parsed[1], words)


def _explicit_count(token: Token) -> tuple[int, bool] | None:
    """(count, written as digits) for a number word one..twelve or digits 1..12."""
    if _DIGIT_COUNT_RE.fullmatch(token.text) and int(token.text) <= MAX_READ_COUNT:
        return int(token.text), True
    if token.lower in _NUMBER_VALUES:
        return _NUMBER_VALUES[token.lower], False
    return None


def _is_number(token: Token) -> bool:
    return token.text.isdecimal() or token.lower in _NUMBER_VALUES


def _noun_phrase(text: str, tokens: Sequence[Token], index: int) -> tuple[Token, ...]:
    """The words after the count word at `index`, up to a stop word, punctuation or the end."""
    words: list[Token] = []
    previous = tokens[index]
    for token in tokens[index + 1 :]:
        if not adjacent(text, previous, token) or ends_noun_phrase(token, bool(words)):
            break
        words.append(token)
        previous = token
    return tuple(words)


def _followed_by_of(text: str, tokens: Sequence[Token], index: int, words: Sequence[Token]) -> bool:
    following = next_adjacent(text, tokens, index + len(words))
    return following is not None and following.lower == "of"


def _after_preposition(text: str, tokens: Sequence[Token], index: int) -> bool:
    if index == 0:
        return False
    before = tokens[index - 1]
    return before.lower in _SKIP_PREPOSITIONS and adjacent(text, before, tokens[index])


def _head_for_count(phrase: CountPhrase, count: int) -> str:
    head = phrase.head.text
    if phrase.count == 1 and count > 1:
        return pluralize(head)
    if phrase.count > 1 and count == 1:
        return singularize(head)
    return head
