"""The generator's world: one-kind scenes, their full prompts, exact labels and renders (32 px,
or the size a generator and its judge are trained at).

Everything the generator, the judge and the trainers see of the shapes world goes through here,
so all three agree on the resolution, the label encoding and the prompt wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shapes_world.grammar import describe
from shapes_world.render import render
from shapes_world.sampling import miscount, random_scene
from shapes_world.scene import Caption, Group, Scene
from shapes_world.vocab import BACKGROUNDS, COLOURS, MAX_COUNT, MIN_COUNT, SHAPES

IMAGE_SIZE = 32  # the shipped generator's resolution; the judge is trained at the same one
# Every resolution a generator and its judge may be trained at (`--size`): 8 px at the
# generator's deepest level and the judge's last feature map. 64 px is where the shipped CLIP
# starts to see counts (README, "Why counting does not move").
IMAGE_SIZES = (32, 64, 128)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models"
SHIPPED_JUDGE_DIR = SHIPPED_DIR / "shapes-judge"
SHIPPED_GENERATOR_DIR = SHIPPED_DIR / "shapes-generator"

# Judge heads: attribute → its classes, in label-index order.
CLASSES: dict[str, tuple] = {
    "count": tuple(range(MIN_COUNT, MAX_COUNT + 1)),
    "colour": tuple(COLOURS),
    "shape": tuple(SHAPES),
    "background": BACKGROUNDS,
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(CLASSES)


def labels_of(scene: Scene) -> np.ndarray:
    """int64 [4]: class index per attribute (count, colour, shape, background) of a one-kind
    scene."""
    (group,) = scene.groups
    values = (group.count, group.colour, group.shape, scene.background)
    return np.array([CLASSES[a].index(v) for a, v in zip(ATTRIBUTE_NAMES, values, strict=True)])


def scene_of_labels(labels: np.ndarray) -> Scene:
    pairs = zip(ATTRIBUTE_NAMES, labels, strict=True)
    count, colour, shape, background = (CLASSES[a][int(i)] for a, i in pairs)
    return Scene(groups=(Group(count, colour, shape),), background=background)


def prompt_of(scene: Scene) -> str:
    """The full-detail prompt: 'three red triangles on a grass background'."""
    return describe(Caption.of(scene))


def all_scenes() -> list[Scene]:
    """Every one-kind scene of the world (6 counts x 7 colours x 5 shapes x 5 backgrounds)."""
    return [
        Scene(groups=(Group(n, c, s),), background=b)
        for n in CLASSES["count"]
        for c in CLASSES["colour"]
        for s in CLASSES["shape"]
        for b in CLASSES["background"]
    ]


def check_size(size: int) -> int:
    """`size` if a generator and judge can be trained at it; else a ValueError naming the
    choices."""
    if size not in IMAGE_SIZES:
        raise ValueError(f"--size must be one of {', '.join(map(str, IMAGE_SIZES))}, got {size}")
    return size


def render_uint8(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] render of a scene."""
    return np.asarray(render(scene, seed, size).image, dtype=np.uint8)


@dataclass
class RenderedSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N, 4], the true attributes of each image
    prompts: list[str]  # the caption each image was paired with (may be miscounted)


def rendered_set(
    n: int, seed: int, miscount_rate: float = 0.0, size: int = IMAGE_SIZE, progress=None
) -> RenderedSet:
    """`n` random one-kind scenes rendered with seeds derived from `seed`; deterministic.

    `miscount_rate`: the fraction of captions whose count is off by one (web-like caption noise,
    as the shipped CLIP was trained with; labels always stay exact)."""
    rng = np.random.default_rng([seed, 7])
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, len(ATTRIBUTE_NAMES)), np.int64)
    prompts = []
    task = progress.add_task("rendering images", total=n) if progress is not None else None
    for i in range(n):
        scene = random_scene(rng, kinds=1)
        images[i] = render_uint8(scene, seed * 10_000_019 + i + 1, size)
        labels[i] = labels_of(scene)
        caption = Caption.of(scene)
        if rng.random() < miscount_rate:
            caption = miscount(caption, rng)
        prompts.append(describe(caption))
        if task is not None and ((i + 1) % 500 == 0 or i + 1 == n):
            progress.update(task, completed=i + 1)
    return RenderedSet(images, labels, prompts)


def prompt_set(n: int, seed: int) -> list[Scene]:
    """A fixed set of `n` prompt scenes for fine-tuning / evaluation, balanced over counts."""
    rng = np.random.default_rng([seed, 11])
    scenes = []
    for i in range(n):
        count = CLASSES["count"][i % MAX_COUNT]
        colour = CLASSES["colour"][int(rng.integers(len(COLOURS)))]
        shape = CLASSES["shape"][int(rng.integers(len(SHAPES)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        scenes.append(Scene(groups=(Group(count, colour, shape),), background=background))
    return scenes
