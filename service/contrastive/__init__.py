"""Contrastive prompts for TextNorm (DESIGN.md section 2.3).

TextNorm scores an image against its prompt *and* a set of contrastive prompts, then reads off
the probability of the true prompt. This package builds those sets without any model:

- **counting**: change the count of the prompt's counted noun phrase by ±1 and ±2, never below
  one ("an airplane" → "two airplanes", "three airplanes"), keeping the number style (digits or
  words) and getting articles and plurals right;
- **composition**: for "<NP1> and <NP2>[ context]", each object alone, every count combination up
  to three of each, and the "X-like Y" / "Y-like X" blends;
- **attributes**: the Lee et al. shapes-world swaps of colour, shape ("object") and background;
- **auto**: composition when it applies, otherwise counting followed by attribute swaps.

It also cleans caller-supplied sets and imports the JSON format the TextNorm authors released,
``{"prompt": ["contrastive prompt", ...], ...}`` (JSON only: never pickle or eval).

Every generator works on the original string: only the words it changes are rewritten, so the
rest of the prompt (capitalisation, punctuation, trailing context) is preserved exactly. The
original prompt never appears in an output (compared case-insensitively with whitespace
collapsed), duplicates are removed keeping the first, and the order is deterministic.
The package is torch-free: stdlib plus the shapes-world vocabulary.

Modules, bottom-up: ``tokens`` (word spans), ``inflection`` (plurals, articles), ``phrases``
(count-phrase detection and re-counting), ``counting``, ``composition`` and ``attributes``
(one rule each), ``dedupe`` (dropping the original and repeats), ``rules`` (the
:func:`contrastive_prompts` dispatcher), ``prompt_sets`` (caller-supplied sets, JSON import)
and ``errors``.
"""

from service.contrastive.attributes import ATTRIBUTE_KINDS, attribute_swaps
from service.contrastive.composition import COMPOSITION_MAX_COUNT
from service.contrastive.errors import NoContrastivePrompts, PromptSetFormatError
from service.contrastive.inflection import pluralize, singularize
from service.contrastive.prompt_sets import (
    clean_contrastive_set,
    load_prompt_sets,
    parse_prompt_sets,
)
from service.contrastive.rules import RULES, contrastive_prompts

__all__ = [
    "ATTRIBUTE_KINDS",
    "COMPOSITION_MAX_COUNT",
    "RULES",
    "NoContrastivePrompts",
    "PromptSetFormatError",
    "attribute_swaps",
    "clean_contrastive_set",
    "contrastive_prompts",
    "load_prompt_sets",
    "parse_prompt_sets",
    "pluralize",
    "singularize",
]
