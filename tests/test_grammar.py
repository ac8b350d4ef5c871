"""Prompt grammar: articles, number words and plurals for every count and vocabulary word."""

import pytest

from shapes_world.grammar import describe, indefinite_article, noun_phrase
from shapes_world.scene import Caption, Group
from shapes_world.vocab import COLOURS, NUMBER_WORDS, SHAPES


@pytest.mark.parametrize(
    ("count", "shape", "colour", "expected"),
    [
        (1, "circle", "red", "a red circle"),
        (1, "circle", "orange", "an orange circle"),
        (1, "star", None, "a star"),
        (2, "cross", "blue", "two blue crosses"),
        (3, "triangle", None, "three triangles"),
        (6, "square", "yellow", "six yellow squares"),
    ],
)
def test_noun_phrases(count, shape, colour, expected):
    assert noun_phrase(count, shape, colour) == expected


@pytest.mark.parametrize("count", range(1, 7))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_count_and_shape(count, shape):
    text = noun_phrase(count, shape, "green")
    words = text.split()
    if count == 1:
        assert words == ["a", "green", shape]
    else:
        assert words[0] == NUMBER_WORDS[count]
        assert words[-1] == SHAPES[shape] and words[-1] != shape


def test_articles_follow_the_next_word():
    for colour in COLOURS:
        expected = "an" if colour[0] in "aeiou" else "a"
        assert noun_phrase(1, "square", colour).split()[0] == expected
    assert indefinite_article("orange") == "an"
    assert indefinite_article("white") == "a"


def test_full_prompts():
    assert (
        describe(Caption((Group(3, "blue", "triangle"),), "grass"))
        == "three blue triangles on a grass background"
    )
    assert (
        describe(Caption((Group(1, "red", "circle"),), "white"))
        == "a red circle on a white background"
    )
    two = Caption((Group(2, "yellow", "circle"), Group(1, "red", "square")), "sky")
    assert describe(two) == "two yellow circles and a red square on a sky background"
    assert describe(Caption((Group(4, None, "star"),))) == "four stars"


@pytest.mark.parametrize("bad", [0, 7, -1])
def test_counts_outside_the_world_are_rejected(bad):
    with pytest.raises(ValueError, match="count must be between 1 and 6"):
        Group(bad, "red", "circle")


def test_unknown_words_are_rejected():
    with pytest.raises(ValueError, match="unknown colour"):
        Group(1, "pink", "circle")
    with pytest.raises(ValueError, match="unknown shape"):
        Group(1, "red", "hexagon")
