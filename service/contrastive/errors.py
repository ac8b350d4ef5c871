"""The two errors the contrastive-prompt package raises, and how they quote a prompt.

Both are ValueErrors: NoContrastivePrompts when a rule leaves nothing for a prompt, and
PromptSetFormatError when an imported prompt-set document has the wrong shape. Messages quote
prompts through :func:`quote_prompt` so a long prompt never floods an error message.
"""

from __future__ import annotations


class NoContrastivePrompts(ValueError):
    """No contrastive prompt could be made for (or was left in the set of) a prompt."""


class PromptSetFormatError(ValueError):
    """A prompt-set document does not have the shape ``{prompt: [contrastive, ...]}``."""


def quote_prompt(prompt: str, limit: int = 80) -> str:
    """The prompt quoted for an error message, cut short when long."""
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 3] + "...")
