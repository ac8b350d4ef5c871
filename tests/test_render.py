"""Rendering: determinism, and ground truth that matches the pixels."""

import io

import numpy as np
import pytest
from scipy import ndimage

from shapes_world.render import render, render_background
from shapes_world.sampling import random_scene
from shapes_world.scene import Group, Scene
from shapes_world.vocab import COLOURS


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes():
    scene = Scene((Group(4, "purple", "star"),), "grass")
    assert png_bytes(render(scene, 7).image) == png_bytes(render(scene, 7).image)


def test_different_seeds_differ():
    scene = Scene((Group(4, "purple", "star"),), "grass")
    a, b = render(scene, 7), render(scene, 8)
    assert a.objects != b.objects
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def object_mask(scene: Scene, seed: int, size: int = 128) -> np.ndarray:
    """Pixels that differ from the same seed's background-only rendering."""
    img = np.asarray(render(scene, seed, size).image, np.int16)
    bg = np.asarray(render_background(scene, seed, size), np.int16)
    return np.abs(img - bg).max(-1) > 24


@pytest.mark.parametrize("seed", range(40))
def test_objects_counted_back_from_pixels(seed):
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, kinds=1 + seed % 2)
    _, components = ndimage.label(object_mask(scene, seed), structure=np.ones((3, 3)))
    assert components == scene.total_objects


@pytest.mark.parametrize("seed", range(10))
def test_object_colours_match_ground_truth(seed):
    rng = np.random.default_rng(100 + seed)
    scene = random_scene(rng)
    rendered = render(scene, seed)
    img = np.asarray(rendered.image, np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    for obj in rendered.objects:
        centre = img[int(obj.y) - 1 : int(obj.y) + 2, int(obj.x) - 1 : int(obj.x) + 2].reshape(
            -1, 3
        )
        nearest = list(COLOURS)[int(np.argmin(((palette - centre.mean(0)) ** 2).sum(-1)))]
        assert nearest == obj.colour == scene.groups[0].colour


def test_layout_matches_scene_and_stays_inside():
    scene = Scene((Group(3, "red", "circle"), Group(3, "blue", "cross")), "sand")
    rendered = render(scene, 3)
    shapes = sorted(o.shape for o in rendered.objects)
    assert shapes == ["circle"] * 3 + ["cross"] * 3
    for o in rendered.objects:
        assert o.radius <= o.x <= 128 - o.radius and o.radius <= o.y <= 128 - o.radius
    for i, a in enumerate(rendered.objects):
        for b in rendered.objects[i + 1 :]:
            assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius


def test_size_option_scales_the_image():
    scene = Scene((Group(2, "green", "square"),), "white")
    assert render(scene, 0, size=256).image.size == (256, 256)
    _, n = ndimage.label(object_mask(scene, 0, size=256))
    assert n == 2
