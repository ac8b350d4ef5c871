"""Which TextNorm prompt set an item was scored with: the comparison key of a prompt and the
sha256 of a set, the same on the gateway, in the direct gRPC client and in a trainer's logs.

Standard library only, so the gateway (service/gateway/prompt_set_registry.py) and every
client share this one definition: a set calibrated by hash (`reward-service calibrate
--prompt-sets`) gets its calibrated c on both paths.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence


def normalise_prompt(prompt: str) -> str:
    """The comparison key of a prompt: whitespace collapsed, case folded, NFC (Unicode's
    canonical caseless match: equal keys for canonically equivalent spellings)."""
    collapsed = unicodedata.normalize("NFD", " ".join(prompt.split()))
    return unicodedata.normalize("NFC", collapsed.casefold())


def contrastive_set_sha256(prompt: str, contrastive: Sequence[str]) -> str:
    """sha256 of a TextNorm prompt set: the normalised prompt and its contrastive prompts, in
    order, as canonical JSON. Every scored item carries it: a training run can prove which set
    produced each TextNorm value (recompute it from the logged prompts)."""
    payload = json.dumps(
        [normalise_prompt(prompt), list(contrastive)], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
