"""The shipped CLIP's frozen text encoder as the generator's conditioning (hidden states)."""

from __future__ import annotations

from pathlib import Path

import torch

from export.clip_model import load_clip, tokenize
from finetune.world_data import SHIPPED_DIR

SHIPPED_CLIP_DIR = SHIPPED_DIR / "shapes-clip"
TOKENS = 16  # every full prompt of the world fits (checked in `encode`)


class TextConditioner:
    """Prompt → last hidden states [L, D] of the frozen CLIP text tower, memoised per prompt
    (an RL run repeats its prompts). '' is the unconditional (classifier-free) embedding."""

    def __init__(self, clip_dir: str | Path = SHIPPED_CLIP_DIR, device: str = "cpu") -> None:
        bundle = load_clip(str(clip_dir))
        self.tokenizer = bundle.tokenizer
        self.text_model = bundle.model.text_model.eval().requires_grad_(False).to(device)
        self.device = device
        self.dim = int(bundle.model.config.text_config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """float32 [N, TOKENS, D] on the conditioner's device."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = tokenize(self.tokenizer, missing)
            eos = self.tokenizer.eos_token_id
            longest = int((ids != eos).sum(1).max()) + 1
            if longest > TOKENS:
                raise ValueError(f"a prompt has {longest} tokens; the generator takes {TOKENS}")
            hidden = self.text_model(input_ids=ids[:, :TOKENS].to(self.device)).last_hidden_state
            for p, h in zip(missing, hidden, strict=True):
                self._cache[p] = h
        return torch.stack([self._cache[p] for p in prompts])
