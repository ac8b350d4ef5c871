"""Scenes and captions as small integer arrays, so "which captions are true of which images"
is one vectorised comparison (used to build soft contrastive targets during training)."""

from __future__ import annotations

import numpy as np

from shapes_world.scene import Caption, Scene
from shapes_world.vocab import BACKGROUNDS, COLOURS, SHAPES

_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
ANY = -1


def encode(item: Scene | Caption) -> np.ndarray:
    """[count per shape..., colour per shape..., background]; ANY where unstated/absent."""
    counts = np.zeros(len(SHAPES), np.int16)
    colours = np.full(len(SHAPES), ANY, np.int16)
    for g in item.groups:
        i = _SHAPE_INDEX[g.shape]
        counts[i] = g.count
        colours[i] = ANY if g.colour is None else _COLOUR_INDEX[g.colour]
    bg = ANY if item.background is None else BACKGROUNDS.index(item.background)
    return np.concatenate([counts, colours, [bg]]).astype(np.int16)


def truth_matrix(scenes: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """bool [n_scenes, n_captions]: same semantics as `Caption.is_true_of`."""
    n = len(SHAPES)
    s, c = scenes[:, None, :], captions[None, :, :]
    counts_ok = (s[..., :n] == c[..., :n]).all(-1)
    colours_ok = ((c[..., n : 2 * n] == ANY) | (s[..., n : 2 * n] == c[..., n : 2 * n])).all(-1)
    background_ok = (c[..., -1] == ANY) | (s[..., -1] == c[..., -1])
    return counts_ok & colours_ok & background_ok
