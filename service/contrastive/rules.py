"""The :func:`contrastive_prompts` entry point: pick a rule, run it, dedupe the result.

RULES names the rules. "counting", "binding", "composition" and "attributes" run one generator
each; "auto" uses binding when the prompt is "<NP1> and <NP2>", otherwise counting followed by
attribute swaps. ("composition" is the paper's templates, kept available: on the shapes-world
benchmark they lower composition AUROC, the binding set does not; README.) Every rule's output
goes through the shared dedupe step, so the original prompt never appears, repeats are dropped
and an empty result raises NoContrastivePrompts.

CONTRASTIVE_RULES maps each TIA2 benchmark category (``shapes_world.benchmark.CATEGORIES``) to
the :class:`CategoryRule` that makes its contrastive prompts; evaluation and ``export.verify``
share it. It lives here, torch-free, so neither of those packages has to import the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from service.contrastive.attributes import (
    ATTRIBUTE_KINDS,
    attribute_candidates,
    attribute_swaps,
)
from service.contrastive.binding import binding_candidates
from service.contrastive.composition import composition_candidates
from service.contrastive.counting import counting_candidates
from service.contrastive.dedupe import check_prompt, finalise
from service.contrastive.vocabulary import Vocabulary

RULES: tuple[str, ...] = ("auto", "counting", "binding", "composition", "attributes")
_NOT_COMPOSITION = "no '<noun phrase> and <noun phrase>' composition with counts found"


def contrastive_prompts(
    prompt: str, rule: str = "auto", *, vocabulary: Vocabulary | None = None
) -> list[str]:
    """Contrastive prompts for `prompt` by `rule` (see the package docstring).

    rule: "counting", "binding", "composition", "attributes" or "auto" (binding if it
    applies, otherwise counting followed by attribute swaps). `vocabulary`: the words of
    attribute swaps and binding sets (None: the default, the shapes world's). Raises
    ValueError for an unknown rule and NoContrastivePrompts (a ValueError) when the rule does
    not apply to the prompt.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of: {', '.join(RULES)}")
    check_prompt(prompt)
    if rule == "counting":
        return finalise(prompt, counting_candidates(prompt), "no count phrase found")
    if rule == "composition":
        return finalise(prompt, composition_candidates(prompt), _NOT_COMPOSITION)
    if rule == "binding":
        candidates = binding_candidates(prompt, vocabulary=vocabulary)
        return finalise(prompt, candidates, _NOT_COMPOSITION)
    if rule == "attributes":
        return attribute_swaps(prompt, vocabulary=vocabulary)
    return _auto(prompt, vocabulary)


def _auto(prompt: str, vocabulary: Vocabulary | None) -> list[str]:
    """Binding when it applies, otherwise counting followed by attribute swaps."""
    binding = binding_candidates(prompt, vocabulary=vocabulary)
    if binding:
        return finalise(prompt, binding, "no composition prompts left")
    reason = "no count phrase, composition or colour/shape/background word found"
    candidates = counting_candidates(prompt) + attribute_candidates(prompt, vocabulary=vocabulary)
    return finalise(prompt, candidates, reason)


@dataclass(frozen=True)
class CategoryRule:
    """How one benchmark category's contrastive prompts are made: a rule from RULES, and for
    "attributes" the kinds to swap. Calling it returns the prompts (as contrastive_prompts)."""

    rule: str
    attributes: tuple[str, ...] = ATTRIBUTE_KINDS

    def __call__(self, prompt: str, *, vocabulary: Vocabulary | None = None) -> list[str]:
        if self.rule == "attributes":
            return attribute_swaps(prompt, self.attributes, vocabulary=vocabulary)
        return contrastive_prompts(prompt, self.rule, vocabulary=vocabulary)


# Benchmark category → how its contrastive prompts are made.
CONTRASTIVE_RULES: Mapping[str, CategoryRule] = MappingProxyType(
    {
        "counting": CategoryRule("counting"),
        "color": CategoryRule("attributes", ("colour",)),
        "background": CategoryRule("attributes", ("background",)),
        "object": CategoryRule("attributes", ("object",)),
        "composition": CategoryRule("binding"),
    }
)
