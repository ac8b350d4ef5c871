"""Random scenes and captions of the world, for training data and benchmarks."""

from __future__ import annotations

import numpy as np

from shapes_world.scene import Caption, Group, Scene
from shapes_world.vocab import BACKGROUNDS, COLOURS, MAX_COUNT, MIN_COUNT, SHAPES

COMPOSITION_MAX_COUNT = 3  # per kind, in two-kind scenes


def random_group(
    rng: np.random.Generator, exclude_shapes: set[str] = frozenset(), max_count: int = MAX_COUNT
) -> Group:
    shapes = [s for s in SHAPES if s not in exclude_shapes]
    return Group(
        count=int(rng.integers(MIN_COUNT, max_count + 1)),
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        shape=shapes[int(rng.integers(len(shapes)))],
    )


def random_scene(rng: np.random.Generator, kinds: int = 1) -> Scene:
    """A scene with `kinds` object groups of distinct shapes (counts ≤ 3 each when kinds > 1)."""
    max_count = MAX_COUNT if kinds == 1 else COMPOSITION_MAX_COUNT
    groups: list[Group] = []
    for _ in range(kinds):
        groups.append(random_group(rng, {g.shape for g in groups}, max_count))
    return Scene(groups=tuple(groups), background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def training_caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A true caption of `scene` at a random level of detail (colour/background may be omitted)."""
    drop_colour = rng.random() < 0.15
    drop_background = rng.random() < 0.25
    groups = tuple(Group(g.count, None if drop_colour else g.colour, g.shape) for g in scene.groups)
    if len(groups) > 1 and rng.random() < 0.5:
        groups = groups[::-1]  # "a circle and a star" and "a star and a circle" both hold
    return Caption(groups=groups, background=None if drop_background else scene.background)


def miscount(caption: Caption, rng: np.random.Generator) -> Caption:
    """The caption with one group's count off by one, as careless web alt-text often is.

    Real CLIP counts poorly largely because its captions rarely state counts, or state them
    wrongly; training the shipped CLIP on some miscounted captions reproduces that weakness.
    """
    index = int(rng.integers(len(caption.groups)))
    group = caption.groups[index]
    step = int(rng.choice([-1, 1]))
    count = (
        group.count + step if MIN_COUNT <= group.count + step <= MAX_COUNT else group.count - step
    )
    groups = list(caption.groups)
    groups[index] = Group(count, group.colour, group.shape)
    return Caption(groups=tuple(groups), background=caption.background)
