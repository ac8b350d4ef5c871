"""Captions vs scenes, their vectorised form, and one-attribute-off perturbations."""

import numpy as np
import pytest

from shapes_world.features import encode, truth_matrix
from shapes_world.perturb import perturb, perturb_composition
from shapes_world.sampling import random_scene, training_caption
from shapes_world.scene import Caption, Group, Scene
from shapes_world.vocab import ATTRIBUTES

SCENE = Scene((Group(3, "blue", "triangle"),), "grass")


def test_caption_truth():
    assert Caption.of(SCENE).is_true_of(SCENE)
    assert Caption((Group(3, None, "triangle"),)).is_true_of(SCENE)
    assert not Caption((Group(2, None, "triangle"),)).is_true_of(SCENE)
    assert not Caption((Group(3, "red", "triangle"),)).is_true_of(SCENE)
    assert not Caption((Group(3, "blue", "triangle"),), "sand").is_true_of(SCENE)
    two = Scene((Group(1, "red", "circle"), Group(2, "blue", "star")), "sky")
    # Every object must be described: "a red circle" alone is not true of the two-kind scene.
    assert not Caption((Group(1, "red", "circle"),), "sky").is_true_of(two)
    assert Caption((Group(2, "blue", "star"), Group(1, "red", "circle"))).is_true_of(two)


def test_scene_json_round_trip():
    two = Scene((Group(1, "red", "circle"), Group(2, "blue", "star")), "sky")
    assert Scene.from_json(two.to_json()) == two


def test_truth_matrix_agrees_with_is_true_of():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, 1 + i % 2) for i in range(60)]
    captions = [training_caption(s, rng) for s in scenes]
    captions += [training_caption(perturb(s, "count", rng), rng) for s in scenes]
    fast = truth_matrix(
        np.stack([encode(s) for s in scenes]), np.stack([encode(c) for c in captions])
    )
    slow = np.array([[c.is_true_of(s) for c in captions] for s in scenes])
    assert fast.shape == (60, 120)
    np.testing.assert_array_equal(fast, slow)
    assert fast.any(axis=1).all()  # every scene has its own true caption


def changed_attributes(a: Scene, b: Scene) -> set[str]:
    out = set()
    if a.background != b.background:
        out.add("background")
    for ga, gb in zip(a.groups, b.groups, strict=True):
        out |= {
            f
            for f, x, y in (
                ("count", ga.count, gb.count),
                ("colour", ga.colour, gb.colour),
                ("shape", ga.shape, gb.shape),
            )
            if x != y
        }
    return out


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_perturb_changes_exactly_one_attribute(attribute):
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = random_scene(rng, 1 + int(rng.integers(2)))
        other = perturb(scene, attribute, rng)
        assert changed_attributes(scene, other) == {attribute}
        assert not Caption.of(scene).is_true_of(other)


def test_composition_perturbations_break_the_caption():
    rng = np.random.default_rng(2)
    for _ in range(100):
        scene = random_scene(rng, 2)
        other = perturb_composition(scene, rng)
        assert other != scene
        assert not Caption.of(scene).is_true_of(other)
        assert all(g.count <= 3 for g in other.groups)


def test_unknown_attribute():
    with pytest.raises(ValueError, match="unknown attribute"):
        perturb(SCENE, "size", np.random.default_rng(0))
