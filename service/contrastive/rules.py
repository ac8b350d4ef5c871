"""The :func:`contrastive_prompts` entry point: pick a rule, run it, dedupe the result.

RULES names the rules. "counting", "composition" and "attributes" run one generator each;
"auto" uses composition when the prompt is "<NP1> and <NP2>", otherwise counting followed by
attribute swaps. Every rule's output goes through the shared dedupe step, so the original
prompt never appears, repeats are dropped and an empty result raises NoContrastivePrompts.
"""

from __future__ import annotations

from service.contrastive.attributes import attribute_candidates, attribute_swaps
from service.contrastive.composition import composition_candidates
from service.contrastive.counting import counting_candidates
from service.contrastive.dedupe import check_prompt, finalise

RULES: tuple[str, ...] = ("auto", "counting", "composition", "attributes")


def contrastive_prompts(prompt: str, rule: str = "auto") -> list[str]:
    """Contrastive prompts for `prompt` by `rule` (see the package docstring).

    rule: "counting", "composition", "attributes" or "auto" (composition if it applies,
    otherwise counting followed by attribute swaps). Raises ValueError for an unknown rule and
    NoContrastivePrompts (a ValueError) when the rule does not apply to the prompt.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of: {', '.join(RULES)}")
    check_prompt(prompt)
    if rule == "counting":
        return finalise(prompt, counting_candidates(prompt), "no count phrase found")
    if rule == "composition":
        reason = "no '<noun phrase> and <noun phrase>' composition with counts found"
        return finalise(prompt, composition_candidates(prompt), reason)
    if rule == "attributes":
        return attribute_swaps(prompt)
    return _auto(prompt)


def _auto(prompt: str) -> list[str]:
    """Composition when it applies, otherwise counting followed by attribute swaps."""
    composition = composition_candidates(prompt)
    if composition:
        return finalise(prompt, composition, "no composition prompts left")
    reason = "no count phrase, composition or colour/shape/background word found"
    return finalise(prompt, counting_candidates(prompt) + attribute_candidates(prompt), reason)
