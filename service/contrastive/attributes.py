"""Attribute swaps for the Lee et al. shapes-world prompts: colour, shape and background.

Each swap replaces one word with every other word of its kind in a :class:`Vocabulary` (the
shapes world's by default; see ``vocabulary``): a colour used as an adjective ("red circle",
not the fruit in "an orange"), a shape name not already in the prompt (singular or plural
kept), or the "<x>" of "<x> background". Kinds are always produced in the order colour, object
(shape), background, and an "a"/"an" right before a swapped word is fixed ("a red circle" →
"an orange circle").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from service.contrastive.dedupe import check_prompt, finalise
from service.contrastive.inflection import article
from service.contrastive.phrases import ends_noun_phrase
from service.contrastive.tokens import Token, adjacent, match_case, next_adjacent, tokenize
from service.contrastive.vocabulary import Vocabulary, resolve

ATTRIBUTE_KINDS: tuple[str, ...] = ("colour", "object", "background")
_ATTRIBUTE_ALIASES: dict[str, str] = {
    "colour": "colour",
    "color": "colour",
    "object": "object",
    "shape": "object",
    "background": "background",
}
# How each kind is named when explaining that nothing could be swapped.
_KIND_NAMES = {"colour": "colour", "object": "shape", "background": "'<x> background'"}
_BACKGROUND_WORDS = ("background", "backgrounds")

_SlotTest = Callable[[str, Sequence[Token], int, Vocabulary], bool]


def attribute_swaps(
    prompt: str,
    attributes: tuple[str, ...] = ATTRIBUTE_KINDS,
    *,
    vocabulary: Vocabulary | None = None,
) -> list[str]:
    """Prompts with one colour, shape or background word swapped for another of the vocabulary.

    Colours first (every other colour, vocabulary order, for each coloured group), then shapes
    (every other shape not already in the prompt, keeping singular/plural), then backgrounds.
    `attributes` restricts the kinds: "colour" (or "color"), "object" (or "shape"),
    "background"; they are always produced in that canonical order. Articles are fixed
    ("a red circle" → "an orange circle"). `vocabulary`: the words to swap (None: the default,
    the shapes world's). Raises NoContrastivePrompts if nothing can be swapped.
    """
    check_prompt(prompt)
    kinds = _attribute_kinds(attributes)
    if not kinds:
        raise ValueError("attributes must name at least one of: colour, object, background")
    reason = f"no {' or '.join(_KIND_NAMES[k] for k in kinds)} word found"
    return finalise(prompt, attribute_candidates(prompt, kinds, vocabulary=vocabulary), reason)


def attribute_candidates(
    prompt: str, kinds: Iterable[str] = ATTRIBUTE_KINDS, *, vocabulary: Vocabulary | None = None
) -> list[str]:
    """Every swap of the given canonical kinds, in order, before dedupe (None: default words)."""
    words = resolve(vocabulary)
    tokens = tokenize(prompt)
    outputs: list[str] = []
    for kind in kinds:
        outputs += _SWAPPERS[kind](prompt, tokens, words)
    return outputs


def _attribute_kinds(attributes: Iterable[str]) -> list[str]:
    """The requested attribute kinds, validated, in canonical order (colour, object, background)."""
    if isinstance(attributes, str):
        attributes = (attributes,)
    requested = set()
    for name in attributes:
        if name not in _ATTRIBUTE_ALIASES:
            allowed = ", ".join(_ATTRIBUTE_ALIASES)
            raise ValueError(f"unknown attribute {name!r}; expected one of: {allowed}")
        requested.add(_ATTRIBUTE_ALIASES[name])
    return [kind for kind in ATTRIBUTE_KINDS if kind in requested]


def _colour_swaps(text: str, tokens: Sequence[Token], words: Vocabulary) -> list[str]:
    return _vocabulary_swaps(text, tokens, words, _is_colour_adjective, words.colours)


def _background_swaps(text: str, tokens: Sequence[Token], words: Vocabulary) -> list[str]:
    return _vocabulary_swaps(text, tokens, words, _is_background_word, words.backgrounds)


def _shape_swaps(text: str, tokens: Sequence[Token], words: Vocabulary) -> list[str]:
    shapes = {index: words.shape_of(token.lower) for index, token in enumerate(tokens)}
    shapes = {index: shape for index, shape in shapes.items() if shape is not None}
    taken = set(shapes.values())
    outputs = []
    for index, own in shapes.items():
        plural = tokens[index].lower != own
        for shape, shape_plural in words.shapes.items():
            if shape == own or shape in taken:
                continue
            new_word = shape_plural if plural else shape
            outputs.append(_swap_token(text, tokens, index, new_word))
    return outputs


_SWAPPERS = {"colour": _colour_swaps, "object": _shape_swaps, "background": _background_swaps}


def _vocabulary_swaps(
    text: str,
    tokens: Sequence[Token],
    words: Vocabulary,
    is_slot: _SlotTest,
    choices: Iterable[str],
) -> list[str]:
    """For each token `is_slot` accepts, the text with every other word of `choices` there."""
    outputs = []
    for index in range(len(tokens)):
        if is_slot(text, tokens, index, words):
            own = tokens[index].lower
            outputs += [_swap_token(text, tokens, index, w) for w in choices if w != own]
    return outputs


def _is_colour_adjective(text: str, tokens: Sequence[Token], index: int, words: Vocabulary) -> bool:
    """A colour word modifying a following word ("red circle"), not a noun ("an orange")."""
    following = next_adjacent(text, tokens, index)
    return (
        tokens[index].lower in words.colours
        and following is not None
        and not ends_noun_phrase(following, has_words=False)
        and following.lower not in _BACKGROUND_WORDS
    )


def _is_background_word(text: str, tokens: Sequence[Token], index: int, words: Vocabulary) -> bool:
    """The "<x>" of "<x> background", with <x> a background of the vocabulary."""
    following = next_adjacent(text, tokens, index)
    return (
        tokens[index].lower in words.backgrounds
        and following is not None
        and following.lower in _BACKGROUND_WORDS
    )


def _swap_token(text: str, tokens: Sequence[Token], index: int, new_word: str) -> str:
    """`text` with token `index` replaced, fixing an "a"/"an" right before it."""
    token = tokens[index]
    replacement = match_case(new_word, token.text)
    start = token.start
    if index > 0 and tokens[index - 1].lower in ("a", "an"):
        article_token = tokens[index - 1]
        if adjacent(text, article_token, token):
            new_article = match_case(article(new_word), article_token.text)
            replacement = new_article + text[article_token.end : token.start] + replacement
            start = article_token.start
    return text[:start] + replacement + text[token.end :]
