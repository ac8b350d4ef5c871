"""English noun inflection and indefinite articles, without any dictionary dependency.

:func:`pluralize` and :func:`singularize` cover regular +s/+es, consonant+y → ies, f/fe → ves,
-man → -men, the common irregular and invariant nouns and the known exceptions to each suffix
rule; only the last hyphen part of a compound changes ("teddy-bear" → "teddy-bears") and its
case style is kept. :func:`article` picks "a" or "an" by sound for the common exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from service.contrastive.tokens import match_case, word_set

_AN_PREFIXES = ("hour", "honest", "honor", "honour", "heir")
_A_PREFIXES = ("uni", "use", "usu", "uti", "ure", "eu", "ewe", "one", "once", "ufo", "uk")

_IRREGULAR_PLURALS = {
    "person": "people",
    "child": "children",
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "ox": "oxen",
    "louse": "lice",
}
_F_PLURALS = {
    "knife": "knives",
    "wife": "wives",
    "life": "lives",
    "leaf": "leaves",
    "loaf": "loaves",
    "wolf": "wolves",
    "shelf": "shelves",
    "half": "halves",
    "calf": "calves",
    "elf": "elves",
    "thief": "thieves",
    "scarf": "scarves",
    "hoof": "hooves",
}
# Nouns whose plural is looked up rather than built, both ways.
_LISTED_PLURALS = {**_IRREGULAR_PLURALS, **_F_PLURALS}
_LISTED_SINGULARS = {plural: singular for singular, plural in _LISTED_PLURALS.items()}
_INVARIANT = word_set(
    "sheep fish deer moose series species aircraft spacecraft salmon trout bison swine"
)
_O_ES = word_set("tomato potato hero echo torpedo veto mosquito volcano")
_MAN_EXCEPTIONS = word_set("human german roman shaman talisman caiman cayman ottoman")
_MEN_SINGULARS = word_set("omen abdomen specimen stamen hymen semen regimen acumen ramen")
# Singulars ending in "ie" (so "cookies" → "cookie", not "cooky").
_IE_SINGULARS = word_set(
    "cookie movie pie tie lie zombie brownie hoodie genie smoothie selfie magpie rookie calorie "
    "budgie goalie"
)
# Plurals in "-ses" whose singular ends in "s" ("buses" → "bus", not "buse").
_SES_PLURALS = word_set(
    "buses gases lenses bonuses viruses octopuses walruses circuses campuses platypuses "
    "cactuses atlases canvases irises"
)
# Plurals in "-ches" whose singular ends in "che" ("headaches" → "headache").
_CHE_PLURALS = word_set("aches headaches moustaches mustaches caches niches avalanches quiches")
_SINGULAR_IS = word_set("iris tennis trellis pelvis chassis")


def article(word: str) -> str:
    """'a' or 'an' before `word`, by sound for the common exceptions ("an hour", "a unicorn")."""
    lower = word.lower()
    if lower.startswith(_AN_PREFIXES):
        return "an"
    if lower.startswith(_A_PREFIXES):
        return "a"
    if lower[:1] in ("a", "e", "i", "o", "u") or lower.startswith("8"):
        return "an"
    digits = re.match(r"[0-9][0-9,]*", lower)  # "eleven…"/"eighteen…": 11, 18, 11,000, 18-wheeler
    if digits and lower[:2] in ("11", "18") and len(digits[0].replace(",", "")) % 3 == 2:
        return "an"
    return "a"


def pluralize(noun: str) -> str:
    """Plural of an English noun: "cross" → "crosses", "knife" → "knives", "sheep" → "sheep".

    Handles regular +s/+es, consonant+y → ies, common f/fe → ves, irregulars (person, child,
    man, woman, mouse, foot, tooth, goose, ...) and invariant nouns; the case style is kept.
    """
    return _inflect(noun, _plural_of)


def singularize(noun: str) -> str:
    """Singular of an English plural noun; the inverse of :func:`pluralize`."""
    return _inflect(noun, _singular_of)


def _inflect(noun: str, change: Callable[[str], str]) -> str:
    """Apply `change` to the last hyphen part of `noun`, keeping that part's case style."""
    head, sep, last = noun.rpartition("-")
    if not last:
        return noun
    return head + sep + match_case(change(last.lower()), last)


def _plural_of(word: str) -> str:
    if word in _INVARIANT:
        return word
    if word in _LISTED_PLURALS:
        return _LISTED_PLURALS[word]
    if word.endswith("man") and len(word) > 3 and word not in _MAN_EXCEPTIONS:
        return word[:-3] + "men"
    if word == "quiz":
        return "quizzes"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")) or word in _O_ES:
        return word + "es"
    return word + "s"


def _singular_of(word: str) -> str:
    if word in _INVARIANT:
        return word
    if word in _LISTED_SINGULARS:
        return _LISTED_SINGULARS[word]
    if word.endswith("men") and len(word) > 3 and word not in _MEN_SINGULARS:
        return word[:-3] + "man"
    return _singular_by_suffix(word)


def _singular_by_suffix(word: str) -> str:
    if word == "quizzes":
        return "quiz"
    if word.endswith("ies") and len(word) > 3:
        return word[:-1] if word[:-1] in _IE_SINGULARS else word[:-3] + "y"
    if word.endswith("oes") and word[:-2] in _O_ES:
        return word[:-2]
    if word in _SES_PLURALS or (
        word.endswith(("sses", "xes", "zzes", "ches", "shes")) and word not in _CHE_PLURALS
    ):
        return word[:-2]
    if word.endswith(("ss", "us")) or word in _SINGULAR_IS or not word.endswith("s"):
        return word
    return word[:-1]
