"""Scene → pixels with Pillow. Same scene and seed → the same bytes.

Randomness comes from three independent streams derived from the seed (background texture,
object layout, sensor noise), so `render_background(scene, seed)` reproduces an image's background
and noise exactly without its objects; tests use that to count objects back from the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shapes_world.scene import Scene
from shapes_world.vocab import COLOURS

DEFAULT_SIZE = 128
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges like a real photo
NOISE_SIGMA = 4.0
COLOUR_JITTER = 12
MIN_GAP = 3  # pixels between objects' bounding circles, so they never touch

_BACKGROUND_STREAM, _LAYOUT_STREAM, _NOISE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: where it is (pixels), how big (bounding-circle radius) and its look."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    rotation: float


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    scene: Scene
    objects: tuple[PlacedObject, ...]
    seed: int


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background, float32 HxWx3 in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "white":
        img = np.full((size, size, 3), 245.0, np.float32)
    elif name == "grass":
        base = np.array([85, 140, 60], np.float32)
        blades = rng.normal(0, 18, (size, size // 2 + 1)).astype(np.float32)
        blades = np.repeat(blades, 2, axis=1)[:, :size]  # vertical streaks
        img = base + blades[..., None] * np.array([0.5, 1.0, 0.4], np.float32)
    elif name == "sand":
        base = np.array([222, 200, 150], np.float32)
        grain = rng.normal(0, 9, (size, size, 1)).astype(np.float32)
        img = base + grain + 12 * np.sin(6.0 * yy + 2.0 * xx)[..., None]
    elif name == "sky":
        top, bottom = np.array([110, 165, 235], np.float32), np.array([190, 220, 250], np.float32)
        img = top + (bottom - top) * yy[..., None]
        img = img + rng.normal(0, 3, (size, size, 1)).astype(np.float32)
    elif name == "brick":
        img = np.full((size, size, 3), (165, 75, 55), np.float32)
        row_h, brick_w = max(size // 10, 4), max(size // 5, 8)
        rows = (np.arange(size) // row_h)[:, None]
        offset = (rows % 2) * (brick_w // 2)
        mortar = (np.arange(size)[:, None] % row_h == 0) | (
            (np.arange(size)[None, :] + offset) % brick_w == 0
        )
        img[mortar] = (200, 190, 180)
        img += rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    else:  # vocab.check_background guards the scene; this guards new backgrounds
        raise ValueError(f"no texture for background {name!r}")
    return img


def _outline(
    shape: str, x: float, y: float, r: float, rotation: float
) -> list[tuple[float, float]]:
    """Polygon of a shape inscribed in the circle of radius r around (x, y)."""
    if shape == "circle":
        angles = [2 * math.pi * k / 48 for k in range(48)]
        radii = [r] * 48
    elif shape == "square":
        angles = [rotation + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        angles = [rotation - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        angles = [rotation - math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    elif shape == "cross":
        a, b = r * 0.95, r * 0.32  # arm half-length and half-width
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
               (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]  # fmt: skip
        c, s = math.cos(rotation), math.sin(rotation)
        return [(x + px * c - py * s, y + px * s + py * c) for px, py in pts]
    else:
        raise ValueError(f"no outline for shape {shape!r}")
    return [
        (x + rr * math.cos(t), y + rr * math.sin(t)) for t, rr in zip(angles, radii, strict=True)
    ]


def _layout(scene: Scene, size: int, rng: np.random.Generator) -> tuple[PlacedObject, ...]:
    """Random non-overlapping positions, sizes and rotations for every object in the scene."""
    wanted = [(g.shape, g.colour) for g in scene.groups for _ in range(g.count)]
    # Fewer objects → larger ones allowed; always small enough that six fit.
    r_max = size * (0.18 if len(wanted) <= 2 else 0.14)
    r_min = size * 0.085
    for _attempt in range(200):
        placed: list[PlacedObject] = []
        for shape, colour in wanted:
            for _try in range(100):
                r = float(rng.uniform(r_min, r_max))
                x = float(rng.uniform(r + 1, size - r - 1))
                y = float(rng.uniform(r + 1, size - r - 1))
                if all(math.hypot(x - o.x, y - o.y) > r + o.radius + MIN_GAP for o in placed):
                    rot = float(rng.uniform(0, 2 * math.pi))
                    placed.append(PlacedObject(shape, colour, x, y, r, rot))
                    break
            else:
                break
        if len(placed) == len(wanted):
            order = rng.permutation(len(placed))  # shapes interleave in drawing order
            return tuple(placed[i] for i in order)
        r_max = max(r_min, r_max * 0.95)
    raise RuntimeError(f"could not place {len(wanted)} objects in a {size}px image")


def _compose(
    background: np.ndarray,
    objects: tuple[PlacedObject, ...],
    size: int,
    colour_rng: np.random.Generator,
    noise_rng: np.random.Generator,
) -> Image.Image:
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize(
        (size * SUPERSAMPLE, size * SUPERSAMPLE), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        jitter = colour_rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        s = SUPERSAMPLE
        draw.polygon(_outline(obj.shape, obj.x * s, obj.y * s, obj.radius * s, obj.rotation), fill)
    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32)
    noisy = small + noise_rng.normal(0, NOISE_SIGMA, small.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def render(scene: Scene, seed: int, size: int = DEFAULT_SIZE) -> Rendered:
    """Draw `scene`; the same (scene, seed, size) always gives the same pixels."""
    layout_rng = _rng(seed, _LAYOUT_STREAM)
    objects = _layout(scene, size, layout_rng)
    image = _compose(
        _background(scene.background, size, _rng(seed, _BACKGROUND_STREAM)),
        objects,
        size,
        layout_rng,
        _rng(seed, _NOISE_STREAM),
    )
    return Rendered(image=image, scene=scene, objects=objects, seed=seed)


def render_background(scene: Scene, seed: int, size: int = DEFAULT_SIZE) -> Image.Image:
    """The image `render(scene, seed, size)` would give, without its objects."""
    return _compose(
        _background(scene.background, size, _rng(seed, _BACKGROUND_STREAM)),
        (),
        size,
        _rng(seed, _LAYOUT_STREAM),
        _rng(seed, _NOISE_STREAM),
    )
