"""The held-out benchmark: deterministic, labelled by majority vote, negatives per category."""

import numpy as np
import pytest

from shapes_world.benchmark import CATEGORIES, build_benchmark
from shapes_world.scene import Caption


def test_deterministic_and_seed_dependent():
    a = build_benchmark(seed=5, prompts_per_category=2, images_per_prompt=10)
    b = build_benchmark(seed=5, prompts_per_category=2, images_per_prompt=10)
    c = build_benchmark(seed=6, prompts_per_category=2, images_per_prompt=10)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert np.array_equal(np.asarray(a[0].items[0].image()), np.asarray(b[0].items[0].image()))


def test_structure_labels_and_negatives():
    bench = build_benchmark(
        seed=1, prompts_per_category=4, images_per_prompt=40, annotator_error=0.1
    )
    assert [p.category for p in bench] == [c for c in CATEGORIES for _ in range(4)]
    flips, votes = 0, 0
    for p in bench:
        caption = Caption.of(p.scene)
        truths = [it.truth for it in p.items]
        assert 0.2 < np.mean(truths) < 0.8  # about half positive
        for it in p.items:
            assert it.truth == caption.is_true_of(it.scene)
            assert it.label == (sum(it.votes) >= 2)
            flips += sum(v != it.truth for v in it.votes)
            votes += len(it.votes)
            if not it.truth and p.category in ("color", "background"):
                attr = "colour" if p.category == "color" else "background"
                same = p.scene.groups[0].colour if attr == "colour" else p.scene.background
                shown = it.scene.groups[0].colour if attr == "colour" else it.scene.background
                assert shown != same
    assert 0.05 < flips / votes < 0.15  # annotators err at about the configured rate


def test_unknown_category():
    with pytest.raises(ValueError, match="unknown categories"):
        build_benchmark(categories=("size",))
