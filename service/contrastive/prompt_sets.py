"""Caller-supplied contrastive sets: cleaning them, and importing the TextNorm authors' JSON.

The released format is ``{"prompt": ["contrastive prompt", ...], ...}``; it is read as JSON only
(never pickle or eval). Each set is stripped, emptied of blanks, of the prompt itself and of
repeats; a malformed document raises PromptSetFormatError naming the offending key or index,
what was expected, and (when read from a file) the file.
"""

from __future__ import annotations

import json
import os

from service.contrastive.dedupe import check_prompt, finalise, normalise
from service.contrastive.errors import NoContrastivePrompts, PromptSetFormatError, quote_prompt


def clean_contrastive_set(prompt: str, candidates: list[str]) -> list[str]:
    """A caller-supplied contrastive set, cleaned.

    Strips each candidate, drops empty ones and the prompt itself, and removes repeats keeping
    the first (compared case-insensitively with whitespace collapsed). Raises
    NoContrastivePrompts when nothing remains, TypeError for a non-string candidate.
    """
    check_prompt(prompt)
    if isinstance(candidates, str | bytes):
        raise TypeError("candidates must be a list of strings, not a single string")
    stripped = []
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, str):
            kind = type(candidate).__name__
            raise TypeError(f"contrastive prompt at index {index} must be a string, got {kind}")
        if candidate.strip():
            stripped.append(candidate.strip())
    return finalise(prompt, stripped, "no candidate left after removing empties and the prompt")


def parse_prompt_sets(data: object) -> dict[str, list[str]]:
    """Validate and clean decoded JSON of the form ``{"prompt": ["contrastive", ...], ...}``.

    Keys are stripped prompts; each set is cleaned with :func:`clean_contrastive_set`.
    Raises PromptSetFormatError naming the offending key or index and what was expected.
    """
    if not isinstance(data, dict):
        raise PromptSetFormatError(
            "expected a JSON object mapping each prompt to an array of contrastive prompts, "
            f"got {json_type(data)}"
        )
    if not data:
        raise PromptSetFormatError("expected at least one prompt set, got an empty object")
    sets: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for position, (key, value) in enumerate(data.items()):
        if not isinstance(key, str) or not key.strip():
            raise PromptSetFormatError(
                f"key at position {position}: expected a non-empty prompt string, got {key!r}"
            )
        prompt = key.strip()
        normalised = normalise(prompt)
        if normalised in seen:
            raise PromptSetFormatError(
                f"prompt set {quote_prompt(key)}: duplicate of prompt "
                f"{quote_prompt(seen[normalised])}"
            )
        seen[normalised] = key
        sets[prompt] = _parse_prompt_set(key, value)
    return sets


def load_prompt_sets(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a JSON prompt-set file (``{"prompt": ["contrastive", ...]}``), validated and cleaned.

    Only JSON is read (never pickle or eval). Raises PromptSetFormatError (message prefixed
    with the path) for invalid JSON or an invalid shape; OSError if the file cannot be read.
    """
    with open(path, encoding="utf-8") as handle:
        try:
            text = handle.read()
        except UnicodeDecodeError as error:
            raise PromptSetFormatError(f"{path}: not UTF-8 text ({error.reason})") from error
    try:
        data = json.loads(text, object_pairs_hook=reject_duplicate_keys)
        return parse_prompt_sets(data)
    except json.JSONDecodeError as error:
        raise PromptSetFormatError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except PromptSetFormatError as error:
        raise PromptSetFormatError(f"{path}: {error}") from error


def _parse_prompt_set(key: str, value: object) -> list[str]:
    """One set's array, type-checked then cleaned against its prompt `key`."""
    if not isinstance(value, list):
        raise PromptSetFormatError(
            f"prompt set {quote_prompt(key)}: expected an array of contrastive prompt strings, "
            f"got {json_type(value)}"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise PromptSetFormatError(
                f"prompt set {quote_prompt(key)}, index {index}: expected a string, "
                f"got {json_type(item)}"
            )
    try:
        return clean_contrastive_set(key, value)
    except NoContrastivePrompts as error:
        raise PromptSetFormatError(
            f"prompt set {quote_prompt(key)}: expected at least one non-empty contrastive prompt "
            "that differs from the prompt"
        ) from error


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` object hook: a key repeated in one object is an error, not last-wins."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise PromptSetFormatError(
                f"duplicate key {quote_prompt(key)}: each prompt must appear once"
            )
        result[key] = value
    return result


def json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)
