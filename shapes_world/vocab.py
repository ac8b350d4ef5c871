"""The closed vocabulary of the shapes world: counts, colours, shapes and backgrounds."""

from __future__ import annotations

MIN_COUNT = 1
MAX_COUNT = 6

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
}

# Object colours, chosen to stay distinguishable from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (25, 175, 45),
    "blue": (30, 70, 215),
    "purple": (135, 45, 175),
    "black": (25, 25, 25),
}

# Shape name → plural.
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}

BACKGROUNDS: tuple[str, ...] = ("white", "grass", "sand", "sky", "brick")

ATTRIBUTES: tuple[str, ...] = ("count", "colour", "shape", "background")


def plural(shape: str) -> str:
    """Plural of a shape name ("cross" → "crosses")."""
    return SHAPES[shape]


def check_count(count: int) -> int:
    if not MIN_COUNT <= count <= MAX_COUNT:
        raise ValueError(f"count must be between {MIN_COUNT} and {MAX_COUNT}, got {count}")
    return count


def check_colour(colour: str) -> str:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    return colour


def check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return shape


def check_background(background: str) -> str:
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    return background
