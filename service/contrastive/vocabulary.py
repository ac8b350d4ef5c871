"""The words the attribute rule swaps, as data: colours, shapes (singular → plural), backgrounds.

A :class:`Vocabulary` is usually read from a JSON file by :func:`load_vocabulary`::

    {"colours": ["red", ...], "shapes": {"circle": "circles", ...}, "backgrounds": ["sky", ...]}

The default, ``default_vocabulary.json`` beside this module, holds the shapes world's words
(``shapes_world.vocab``; a test keeps the two equal). Every word is one lowercase token (as
:func:`~service.contrastive.tokens.tokenize` splits words); a shape word, singular or plural,
may not also be a colour or a background (a colour may be a background: the rule tells them
apart by the "background" after it). Number words are not vocabulary: the counting rule reads
plain English count words (``service.contrastive.phrases.NUMBER_WORDS``) in any prompt.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from service.contrastive.prompt_sets import json_type
from service.contrastive.tokens import tokenize

DEFAULT_VOCABULARY_FILE = Path(__file__).with_name("default_vocabulary.json")
_KEYS = ("colours", "shapes", "backgrounds")


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The colours, shapes ({singular: plural}) and backgrounds that attribute swaps use.

    Order matters: swaps follow it. Raises ValueError (one line, naming the offending entry)
    for a word that is not one lowercase token, a repeat, or a shape word that is also a colour
    or background.
    """

    colours: tuple[str, ...]
    shapes: Mapping[str, str]
    backgrounds: tuple[str, ...]
    _singulars: Mapping[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        colours = _word_list("colours", self.colours)
        backgrounds = _word_list("backgrounds", self.backgrounds)
        singulars = _shape_singulars(self.shapes)
        for word in singulars:
            for name, words in (("colours", colours), ("backgrounds", backgrounds)):
                if word in words:
                    raise ValueError(f"shapes: {word!r} is also in {name}")
        object.__setattr__(self, "colours", colours)
        object.__setattr__(self, "backgrounds", backgrounds)
        object.__setattr__(self, "shapes", MappingProxyType(dict(self.shapes)))
        object.__setattr__(self, "_singulars", MappingProxyType(singulars))

    def shape_of(self, word: str) -> str | None:
        """The singular shape a lowercase word names, singular or plural ("crosses" → "cross")."""
        return self._singulars.get(word)

    def _key(self) -> tuple[object, ...]:
        return self.colours, tuple(self.shapes.items()), self.backgrounds

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def parse_vocabulary(data: object) -> Vocabulary:
    """A Vocabulary from decoded JSON ``{"colours": [...], "shapes": {...}, "backgrounds": [...]}``.

    Raises ValueError (one line) naming the missing, unknown or malformed key or entry.
    """
    if not isinstance(data, dict):
        raise ValueError(
            f"expected a JSON object with keys {', '.join(_KEYS)}, got {json_type(data)}"
        )
    unknown = [key for key in data if key not in _KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; expected only: {', '.join(_KEYS)}")
    missing = [key for key in _KEYS if key not in data]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    for key in ("colours", "backgrounds"):
        if not isinstance(data[key], list):
            raise ValueError(f"{key}: expected an array of words, got {json_type(data[key])}")
    if not isinstance(data["shapes"], dict):
        kind = json_type(data["shapes"])
        raise ValueError(f"shapes: expected an object mapping singular to plural, got {kind}")
    return Vocabulary(tuple(data["colours"]), data["shapes"], tuple(data["backgrounds"]))


def load_vocabulary(path: str | os.PathLike[str]) -> Vocabulary:
    """Read and validate a vocabulary JSON file (format in the module docstring).

    Raises ValueError (one line, prefixed with the path) for text that is not UTF-8 JSON, a
    repeated key or an invalid vocabulary; OSError if the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from error
    try:
        return parse_vocabulary(json.loads(text, object_pairs_hook=_reject_duplicate_keys))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The shipped default (the shapes world's words), read once from DEFAULT_VOCABULARY_FILE."""
    return load_vocabulary(DEFAULT_VOCABULARY_FILE)


def resolve(vocabulary: Vocabulary | None) -> Vocabulary:
    """`vocabulary`, or the default when None."""
    return default_vocabulary() if vocabulary is None else vocabulary


def _word_list(name: str, words: Iterable[str]) -> tuple[str, ...]:
    """`words` as a tuple, each checked to be a new lowercase single-token word."""
    if isinstance(words, str | bytes):
        raise ValueError(f"{name}: expected a list of words, got a single string")
    checked: tuple[str, ...] = ()
    for index, word in enumerate(words):
        _check_word(f"{name}[{index}]", word)
        if word in checked:
            raise ValueError(f"{name}[{index}]: {word!r} is repeated")
        checked += (word,)
    return checked


def _shape_singulars(shapes: object) -> dict[str, str]:
    """{singular or plural: singular}, each word checked; plurals may not name two shapes."""
    if not isinstance(shapes, Mapping):
        raise ValueError(
            f"shapes: expected a mapping of singular to plural, got {json_type(shapes)}"
        )
    singulars: dict[str, str] = {}
    for singular, plural in shapes.items():
        _check_word("shapes key", singular)
        _check_word(f"shapes[{singular!r}]", plural)
        singulars[singular] = singular
    for singular, plural in shapes.items():
        if singulars.get(plural, singular) != singular:
            raise ValueError(f"shapes[{singular!r}]: plural {plural!r} already names a shape")
        singulars[plural] = singular
    return singulars


def _check_word(where: str, word: object) -> None:
    """Raise ValueError unless `word` is one lowercase token."""
    if not isinstance(word, str):
        raise ValueError(f"{where}: expected a word (string), got {json_type(word)}")
    tokens = tokenize(word)
    if word != word.lower() or len(tokens) != 1 or tokens[0].text != word:
        raise ValueError(f"{where}: expected one lowercase word, got {word!r}")


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` object hook: a key repeated in one object is an error, not last-wins."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
