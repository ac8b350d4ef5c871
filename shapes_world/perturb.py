"""One-attribute-off scenes: what a reward has to tell apart from the true image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from shapes_world.scene import Group, Scene
from shapes_world.vocab import ATTRIBUTES, BACKGROUNDS, COLOURS, MAX_COUNT, MIN_COUNT, SHAPES

COMPOSITION_CHANGES = ("drop_object", "swap_object", "change_count")


def _pick(rng: np.random.Generator, options: list) -> object:
    return options[int(rng.integers(len(options)))]


def perturb(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    """A scene that differs from `scene` in exactly `attribute` of one object group.

    `attribute` is one of count, colour, shape, background. For count the new count stays in
    the world's range and differs from the old one (nearby counts are likelier: they are the
    hard cases).
    """
    if attribute == "background":
        return replace(
            scene, background=_pick(rng, [b for b in BACKGROUNDS if b != scene.background])
        )
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
    index = int(rng.integers(len(scene.groups)))
    group = scene.groups[index]
    if attribute == "count":
        options = [c for c in range(MIN_COUNT, MAX_COUNT + 1) if c != group.count]
        weights = np.array([1.0 / abs(c - group.count) for c in options])
        new = replace(group, count=int(rng.choice(options, p=weights / weights.sum())))
    elif attribute == "colour":
        new = replace(group, colour=_pick(rng, [c for c in COLOURS if c != group.colour]))
    else:
        taken = {g.shape for g in scene.groups}
        new = replace(group, shape=_pick(rng, [s for s in SHAPES if s not in taken]))
    groups = list(scene.groups)
    groups[index] = new
    return replace(scene, groups=tuple(groups))


def perturb_composition(scene: Scene, rng: np.random.Generator) -> Scene:
    """For a two-kind scene: drop one kind, swap one kind for another, or change one count."""
    if len(scene.groups) < 2:
        raise ValueError("composition perturbations need a scene with two object kinds")
    change = _pick(rng, list(COMPOSITION_CHANGES))
    if change == "drop_object":
        keep = int(rng.integers(len(scene.groups)))
        return replace(scene, groups=(scene.groups[keep],))
    if change == "swap_object":
        return perturb(scene, "shape", rng)
    index = int(rng.integers(len(scene.groups)))
    groups = list(scene.groups)
    groups[index] = Group(
        min(groups[index].count + 1, 3), groups[index].colour, groups[index].shape
    )
    if groups[index] == scene.groups[index]:  # already at 3: go down instead
        groups[index] = replace(groups[index], count=groups[index].count - 1)
    return replace(scene, groups=tuple(groups))
