"""Contrastive prompts for TextNorm (DESIGN.md section 2.3).

TextNorm scores an image against its prompt *and* a set of contrastive prompts, then reads off
the probability of the true prompt. This package builds those sets without any model:

- **counting**: change the count of the prompt's counted noun phrase by ±1 and ±2, never below
  one ("an airplane" → "two airplanes", "three airplanes"), keeping the number style (digits or
  words) and getting articles and plurals right;
- **binding** (the default for compositions): for "<NP1> and <NP2>[ context]", each object alone,
  one object replaced by another kind, one count changed by ±1/±2, the colours swapped between
  the objects, one colour changed — the errors a composition reward must catch;
- **composition** (the paper's templates, kept available): for "<NP1> and <NP2>[ context]",
  each object alone, every count combination up to three of each, and the "X-like Y" /
  "Y-like X" blends;
- **attributes**: the Lee et al. swaps of colour, shape ("object") and background, over a
  :class:`Vocabulary` (data: the shapes world's words by default, or any JSON file read by
  :func:`load_vocabulary`);
- **auto**: binding when it applies, otherwise counting followed by attribute swaps.

It also cleans caller-supplied sets and imports the JSON format the TextNorm authors released,
``{"prompt": ["contrastive prompt", ...], ...}`` (JSON only: never pickle or eval).

Every generator works on the original string: only the words it changes are rewritten, so the
rest of the prompt (capitalisation, punctuation, trailing context) is preserved exactly. The
original prompt never appears in an output (compared case-insensitively with whitespace
collapsed), duplicates are removed keeping the first, and the order is deterministic.
The package is torch-free and stdlib-only; it imports no other package of this project.

Modules, bottom-up: ``tokens`` (word spans), ``inflection`` (plurals, articles), ``phrases``
(count-phrase detection and re-counting, English number words), ``vocabulary`` (the words
attribute swaps use), ``counting``, ``binding``, ``composition`` and ``attributes`` (one rule each),
``dedupe`` (dropping the original and repeats), ``rules`` (the :func:`contrastive_prompts`
dispatcher and the benchmark category → rule table), ``prompt_sets`` (caller-supplied sets,
JSON import) and ``errors``.
"""

from service.contrastive.attributes import ATTRIBUTE_KINDS, attribute_swaps
from service.contrastive.binding import BINDING_COUNT_STEPS, binding_candidates
from service.contrastive.composition import COMPOSITION_MAX_COUNT
from service.contrastive.errors import NoContrastivePrompts, PromptSetFormatError
from service.contrastive.inflection import pluralize, singularize
from service.contrastive.prompt_sets import (
    clean_contrastive_set,
    load_prompt_sets,
    parse_prompt_sets,
)
from service.contrastive.rules import CONTRASTIVE_RULES, RULES, CategoryRule, contrastive_prompts
from service.contrastive.vocabulary import (
    DEFAULT_VOCABULARY_FILE,
    Vocabulary,
    default_vocabulary,
    load_vocabulary,
    parse_vocabulary,
)

__all__ = [
    "ATTRIBUTE_KINDS",
    "BINDING_COUNT_STEPS",
    "COMPOSITION_MAX_COUNT",
    "CONTRASTIVE_RULES",
    "DEFAULT_VOCABULARY_FILE",
    "RULES",
    "CategoryRule",
    "NoContrastivePrompts",
    "PromptSetFormatError",
    "Vocabulary",
    "attribute_swaps",
    "binding_candidates",
    "clean_contrastive_set",
    "contrastive_prompts",
    "default_vocabulary",
    "load_prompt_sets",
    "load_vocabulary",
    "parse_prompt_sets",
    "parse_vocabulary",
    "pluralize",
    "singularize",
]
