"""The registry of contrastive prompt sets (in memory, per gateway process).

A set is a prompt and its cleaned contrastive prompts (`clean_contrastive_set`: stripped, no
blanks, no prompt, no repeats). Its id is a content hash (``ps_`` + the first 32 hex digits of
`contrastive_set_sha256`), so the same content has the same id on every gateway replica: a set
registered on one replica can be registered again on another under the same id (the client
does this when a replica answers `unknown_prompt_set`), and registering twice is idempotent.

Replicas share no state, so a set registered through the API applies only where a request
names its id. Sets the operator configures (`REWARD_PROMPT_SETS_FILE`, loaded at start on
every replica) also apply to their prompt without an id (prompts compared normalised: NFC,
case-folded, whitespace collapsed); the latest such set for a prompt wins.
Imports (`parse_prompt_sets`, the TextNorm authors' JSON format) register one set per prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from textnorm_reward_client.prompt_identity import contrastive_set_sha256, normalise_prompt

from service.contrastive import NoContrastivePrompts, clean_contrastive_set

CONTENT_ID_PREFIX = "ps_"
PROMPT_SET_ID_PATTERN = r"^ps_[0-9a-f]{32}$"
SOURCES = ("registered", "imported", "configured")  # configured: the operator's file, at start


class PromptSetConflict(ValueError):
    """An id already names a set with different content."""


class RegistryFull(ValueError):
    """The registry holds `max_sets` sets already."""


@dataclass(frozen=True)
class PromptSet:
    id: str
    prompt: str
    contrastive: tuple[str, ...]
    source: str  # "registered" | "imported"
    seq: int = field(default_factory=itertools.count().__next__)  # registration order

    @property
    def content_key(self) -> tuple[str, tuple[str, ...]]:
        return normalise_prompt(self.prompt), self.contrastive


def content_id(prompt: str, contrastive: list[str] | tuple[str, ...]) -> str:
    """The id of a prompt set: the same on every replica for the same content."""
    return CONTENT_ID_PREFIX + contrastive_set_sha256(prompt, contrastive)[:32]


class PromptSetRegistry:
    def __init__(self, max_sets: int) -> None:
        self.max_sets = max_sets
        self._sets: dict[str, PromptSet] = {}
        self._by_prompt: dict[str, str] = {}  # normalised prompt → id (latest registration)

    def __len__(self) -> int:
        return len(self._sets)

    @staticmethod
    def clean(prompt: str, contrastive: list[str]) -> tuple[str, ...]:
        """The cleaned set; NoContrastivePrompts when nothing is left."""
        return tuple(clean_contrastive_set(prompt, contrastive))

    def prepare(
        self, prompt: str, contrastive: tuple[str, ...], source: str, pending: int = 0
    ) -> tuple[PromptSet, bool]:
        """The set to add (not added yet) and whether it is new. Raises PromptSetConflict
        when its content id names a set with different content (a hash collision),
        RegistryFull when the registry (with `pending` sets about to be added) is full."""
        set_id = content_id(prompt, contrastive)
        candidate = PromptSet(set_id, prompt.strip(), contrastive, source)
        existing = self._sets.get(set_id)
        if existing is not None:
            if existing.content_key != candidate.content_key:
                raise PromptSetConflict(
                    f"prompt set {set_id!r} already exists with a different prompt or set"
                )
            return existing, False
        if len(self._sets) + pending >= self.max_sets:
            raise RegistryFull(f"the registry already holds {self.max_sets} prompt sets")
        return candidate, True

    def add(self, prompt_set: PromptSet) -> None:
        """Add a prepared set; a configured one also applies to its prompt without an id."""
        self._sets[prompt_set.id] = prompt_set
        if prompt_set.source == "configured":
            self._by_prompt[normalise_prompt(prompt_set.prompt)] = prompt_set.id

    def get(self, set_id: str) -> PromptSet | None:
        return self._sets.get(set_id)

    def for_prompt(self, prompt: str) -> PromptSet | None:
        set_id = self._by_prompt.get(normalise_prompt(prompt))
        return self._sets.get(set_id) if set_id is not None else None

    def all(self) -> list[PromptSet]:
        return sorted(self._sets.values(), key=lambda s: s.seq)

    def remove(self, set_id: str) -> PromptSet | None:
        removed = self._sets.pop(set_id, None)
        if removed is None:
            return None
        key = normalise_prompt(removed.prompt)
        if self._by_prompt.get(key) == set_id:
            del self._by_prompt[key]
            # Another configured set for the same prompt takes over, newest first.
            others = [
                s
                for s in self._sets.values()
                if s.source == "configured" and normalise_prompt(s.prompt) == key
            ]
            if others:
                self._by_prompt[key] = max(others, key=lambda s: s.seq).id
        return removed


__all__ = [
    "CONTENT_ID_PREFIX",
    "NoContrastivePrompts",
    "PROMPT_SET_ID_PATTERN",
    "PromptSet",
    "PromptSetConflict",
    "PromptSetRegistry",
    "RegistryFull",
    "SOURCES",
    "content_id",
    "contrastive_set_sha256",
]
