"""What an image contains (a `Scene`) and what a prompt claims about it (a `Caption`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from shapes_world.vocab import check_background, check_colour, check_count, check_shape


@dataclass(frozen=True, order=True)
class Group:
    """`count` objects of one shape; `colour` None in a caption means "any colour"."""

    count: int
    colour: str | None
    shape: str

    def __post_init__(self) -> None:
        check_count(self.count)
        check_shape(self.shape)
        if self.colour is not None:
            check_colour(self.colour)


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: object groups (distinct shapes) on a background."""

    groups: tuple[Group, ...]
    background: str

    def __post_init__(self) -> None:
        check_background(self.background)
        if not self.groups:
            raise ValueError("a scene needs at least one object group")
        if any(g.colour is None for g in self.groups):
            raise ValueError("every object group of a scene needs a colour")
        shapes = [g.shape for g in self.groups]
        if len(set(shapes)) != len(shapes):
            raise ValueError("object groups of a scene must have distinct shapes")

    @property
    def total_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_json(self) -> dict:
        return {
            "background": self.background,
            "groups": [
                {"count": g.count, "colour": g.colour, "shape": g.shape} for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        groups = tuple(Group(g["count"], g["colour"], g["shape"]) for g in data["groups"])
        return cls(groups=groups, background=data["background"])


@dataclass(frozen=True)
class Caption:
    """A prompt's claims: groups (colour optional) and, optionally, the background."""

    groups: tuple[Group, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        if self.background is not None:
            check_background(self.background)
        if not self.groups:
            raise ValueError("a caption needs at least one object group")

    @classmethod
    def of(cls, scene: Scene) -> Caption:
        """The full-detail caption of a scene."""
        return cls(groups=scene.groups, background=scene.background)

    def is_true_of(self, scene: Scene) -> bool:
        """Whether an image with ground truth `scene` matches this caption exactly.

        Every object in the scene must be described (no unmentioned extra objects), counts must
        be equal, and colour/background must agree where the caption states them.
        """
        if self.background is not None and self.background != scene.background:
            return False
        if len(self.groups) != len(scene.groups):
            return False
        by_shape = {g.shape: g for g in scene.groups}
        for claimed in self.groups:
            actual = by_shape.get(claimed.shape)
            if actual is None or actual.count != claimed.count:
                return False
            if claimed.colour is not None and claimed.colour != actual.colour:
                return False
        return Counter(g.shape for g in self.groups) == Counter(g.shape for g in scene.groups)
