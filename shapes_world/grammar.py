"""Scene/caption → natural English: articles, number words and plurals."""

from __future__ import annotations

from shapes_world.scene import Caption, Group
from shapes_world.vocab import NUMBER_WORDS, plural

VOWEL_SOUNDS = ("a", "e", "i", "o", "u")


def indefinite_article(word: str) -> str:
    """'a' or 'an' before `word` (by its first letter; enough for this vocabulary)."""
    return "an" if word[:1].lower() in VOWEL_SOUNDS else "a"


def noun_phrase(count: int, shape: str, colour: str | None = None) -> str:
    """'a red circle', 'an orange star', 'three crosses', 'two blue squares'."""
    noun = shape if count == 1 else plural(shape)
    words = [colour, noun] if colour else [noun]
    head = " ".join(words)
    if count == 1:
        return f"{indefinite_article(head)} {head}"
    return f"{NUMBER_WORDS[count]} {head}"


def group_phrase(group: Group) -> str:
    return noun_phrase(group.count, group.shape, group.colour)


def describe(caption: Caption) -> str:
    """The prompt for a caption: groups joined by 'and', then 'on a … background' if stated."""
    text = " and ".join(group_phrase(g) for g in caption.groups)
    if caption.background is not None:
        text += f" on {indefinite_article(caption.background)} {caption.background} background"
    return text
