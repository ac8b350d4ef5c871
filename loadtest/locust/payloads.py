"""Request payloads, built once per process before any user starts (never in the request loop).

A pool of distinct shapes-world prompts (random scenes, full-detail captions), each with B images
of its scene rendered with B seeds at one size. Per prompt: the REST body already serialised to
JSON bytes (base64 PNGs) and, for the gRPC user, the uint8 pixels [B, H, W, 3].
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from shapes_world.grammar import describe
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption

SEED = 0


@dataclass(frozen=True)
class PromptPayload:
    prompt: str
    pixels: np.ndarray  # uint8 [B, H, W, 3], the decoded PNGs
    score_body: bytes  # JSON of POST /v1/score: B items of this prompt
    group_body: bytes  # JSON of POST /v1/score/group (with advantages)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@cache
def build(prompts: int, images: int, size: int) -> tuple[PromptPayload, ...]:
    """`prompts` distinct prompts × `images` images of `size` px (deterministic)."""
    if prompts < 1 or images < 1 or size < 8:
        raise ValueError("need at least one prompt, one image and 8 px")
    rng = np.random.default_rng(SEED)
    out: list[PromptPayload] = []
    seen: set[str] = set()
    for _ in range(1000 * prompts):
        if len(out) == prompts:
            break
        scene = random_scene(rng, kinds=1 + int(rng.integers(2)))
        prompt = describe(Caption.of(scene))
        if prompt in seen:
            continue
        seen.add(prompt)
        rendered = [
            render(scene, seed=len(out) * images + k, size=size).image for k in range(images)
        ]
        encoded = [base64.b64encode(_png(image)).decode("ascii") for image in rendered]
        score = {"items": [{"image": b64, "prompt": prompt} for b64 in encoded]}
        group = {"prompt": prompt, "images": encoded, "advantages": True}
        out.append(
            PromptPayload(
                prompt=prompt,
                pixels=np.stack([np.asarray(image.convert("RGB")) for image in rendered]),
                score_body=json.dumps(score).encode(),
                group_body=json.dumps(group).encode(),
            )
        )
    if len(out) < prompts:
        raise ValueError(f"the shapes world gave only {len(out)} distinct prompts")
    return tuple(out)
