"""The last step every generator shares: drop the original prompt and repeats, or say why empty.

Prompts are compared case-insensitively with whitespace collapsed and Unicode canonically
normalised, so "A  Cat" repeats "a cat" and "cafe\u0301" (a combining accent) repeats "café".
The first of any repeats is kept, so the order stays deterministic, and an empty result raises
NoContrastivePrompts with the reason the rule did not apply.
"""

from __future__ import annotations

from collections.abc import Iterable

from textnorm_reward_client.prompt_identity import normalise_prompt as normalise

from service.contrastive.errors import NoContrastivePrompts, quote_prompt

__all__ = ["check_prompt", "finalise", "normalise"]


def check_prompt(prompt: object) -> None:
    """Raise TypeError unless `prompt` is a string."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")


def finalise(prompt: str, candidates: Iterable[str], reason: str) -> list[str]:
    """`candidates` without the prompt and repeats; NoContrastivePrompts(`reason`) if none left."""
    unique = _unique_excluding(prompt, candidates)
    if not unique:
        raise NoContrastivePrompts(f"no contrastive prompts: {reason} in {quote_prompt(prompt)}")
    return unique


def _unique_excluding(prompt: str, candidates: Iterable[str]) -> list[str]:
    """Candidates minus the prompt itself and repeats (first kept), compared normalised."""
    seen = {normalise(prompt)}
    unique = []
    for candidate in candidates:
        key = normalise(candidate)
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique
