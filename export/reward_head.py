"""The learned reward head of Lee et al. (DESIGN.md 2.2): an MLP on frozen CLIP embeddings.

Input: L2-normalised image and text embeddings; features [img, txt, img ⊙ txt]; output a reward
in (0, 1) that predicts P(a person says the image matches the prompt). Saved as safetensors plus
a JSON config (no pickle).

TextNorm over the head uses its logits (log-odds), not the sigmoid: a confident head saturates
at 1e-9 or 1 - 1e-9 for several prompts, where min-max normalisation would amplify float32
rounding into the result. The logit is a monotone map of the reward, so the head's own ranking
(and AUROC) is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS, CONFIG = "head.safetensors", "head_config.json"


class RewardHead(nn.Module):
    def __init__(self, embed_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.embed_dim, self.hidden = embed_dim, hidden
        self.mlp = nn.Sequential(
            nn.Linear(3 * embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores; image [..., D] and text [..., D] broadcast together."""
        image, text = torch.broadcast_tensors(image, text)
        return self.mlp(torch.cat([image, text, image * text], dim=-1)).squeeze(-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(image, text))


def save_head(head: RewardHead, out_dir: Path, metadata: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / WEIGHTS))
    config = {"embed_dim": head.embed_dim, "hidden": head.hidden, **metadata}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_head(path: Path) -> tuple[RewardHead, dict]:
    """Load a head directory; raises ValueError with a one-line message if it is not one."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise ValueError(f"not a reward-head directory (needs {WEIGHTS} and {CONFIG}): {path}")
    config = json.loads((path / CONFIG).read_text())
    head = RewardHead(config["embed_dim"], config["hidden"])
    head.load_state_dict(load_file(str(path / WEIGHTS)))
    return head.eval(), config
