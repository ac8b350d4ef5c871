"""A held-out TIA2-style benchmark drawn from the world (DESIGN.md section 2.4).

For each prompt, a set of images: about half show exactly what the prompt says, the rest differ
in one attribute of the prompt's category. Each image is labelled by three simulated annotators
who each err with a small probability; the label is their majority vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shapes_world.grammar import describe
from shapes_world.perturb import perturb, perturb_composition
from shapes_world.render import render
from shapes_world.sampling import random_scene
from shapes_world.scene import Caption, Scene

# Benchmark category → the scene attribute its negatives differ in.
CATEGORIES: dict[str, str] = {
    "counting": "count",
    "color": "colour",
    "background": "background",
    "object": "shape",
    "composition": "composition",
}
DEFAULT_SEED = 20_240_611  # far from the training seeds; see `image_seed`
ANNOTATORS = 3


@dataclass(frozen=True)
class BenchmarkItem:
    scene: Scene
    render_seed: int
    truth: bool
    votes: tuple[bool, ...]

    @property
    def label(self) -> bool:
        """Majority of the annotators' votes."""
        return sum(self.votes) * 2 > len(self.votes)

    def image(self, size: int | None = None) -> Image.Image:
        return render(self.scene, self.render_seed, *(() if size is None else (size,))).image


@dataclass(frozen=True)
class BenchmarkPrompt:
    category: str
    prompt: str
    scene: Scene  # the scene the prompt describes
    items: tuple[BenchmarkItem, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], bool)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Render seed of one benchmark image (disjoint from training's 0..10^7·seed range)."""
    return 2**40 + seed * 10**6 + prompt_index * 1000 + image_index


def _negative(scene: Scene, category: str, rng: np.random.Generator) -> Scene:
    if category == "composition":
        return perturb_composition(scene, rng)
    return perturb(scene, CATEGORIES[category], rng)


def build_benchmark(
    seed: int = DEFAULT_SEED,
    prompts_per_category: int = 10,
    images_per_prompt: int = 50,
    annotator_error: float = 0.1,
    categories: tuple[str, ...] = tuple(CATEGORIES),
) -> list[BenchmarkPrompt]:
    """Deterministic in its arguments. Unknown categories raise ValueError."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    rng = np.random.default_rng(seed)
    prompts: list[BenchmarkPrompt] = []
    for category in categories:
        for _ in range(prompts_per_category):
            index = len(prompts)
            scene = random_scene(rng, kinds=2 if category == "composition" else 1)
            caption = Caption.of(scene)
            items = []
            for j in range(images_per_prompt):
                shown = scene if rng.random() < 0.5 else _negative(scene, category, rng)
                truth = caption.is_true_of(shown)
                votes = tuple(
                    bool(truth != (rng.random() < annotator_error)) for _ in range(ANNOTATORS)
                )
                items.append(BenchmarkItem(shown, image_seed(seed, index, j), truth, votes))
            prompts.append(BenchmarkPrompt(category, describe(caption), scene, tuple(items)))
    return prompts
