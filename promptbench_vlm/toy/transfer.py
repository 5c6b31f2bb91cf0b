"""The toy world's transfer targets: other classes (cross-dataset) and shifted domains (DG).

The papers' two other protocols train on ImageNet and evaluate on datasets the learner never
saw: cross-dataset transfer on 10 datasets with classes of their own, domain generalisation on
ImageNet-V2, -Sketch, -A and -R (the same classes, or a 200-class subset of them, in another
domain). These are their offline analogues for `toy-shapes`, drawn by the same routine
(`shapes.draw_scene`) with the same `toy-clip` checkpoint, so a target differs from the source
only in what it sets on purpose (docs/toy-world.md has the measurements):

Cross-dataset targets (classes of their own, the same warm light as toy-shapes):

- ``toy-colours``: 8 classes, the colour names (``red``); each image's shape is drawn at random.
- ``toy-forms``: 6 classes, the shape names (``star``); each image's colour is drawn at random.

Domain-generalisation targets, ``toy-shapes:DOMAIN`` (toy-shapes' classes, another domain):

- ``v2``: a fresh draw of the test distribution (ImageNet-V2: a re-collection).
- ``sketch``: every object drawn as loose strokes (ImageNet-Sketch).
- ``hard``: small, blurred objects; every other class, 24 of 48 (ImageNet-A: hard images of a
  200-class subset).
- ``rendition``: outlines under a cool light; every other class (ImageNet-R: renditions of a
  200-class subset).

Every image is a pure function of ``(dataset, split, index, seed)``, from a random stream of its
own (never one of toy-shapes' images). A subset domain records the toy-shapes label of each of
its classes in ``source_labels``, as ``coop:imagenet_a`` does for ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from ..data import DatasetOptions, DatasetSource
from ..data.base import ImageDataset
from ..names import unknown_name_error
from .shapes import (CLASSNAMES, COLOURS, DATASET_LIGHT, LIGHTS, SHAPES, SPLIT_SIZES, _SPLIT_STREAMS, _draw_factors,
                     draw_scene)

COOL_LIGHT = (0.85, 1.0, 1.2)
"""The rendition domain's lamp: a blue cast, the opposite of toy-shapes' warm one."""


@dataclass(frozen=True)
class Domain:
    """A shifted domain of toy-shapes.

    Attributes:
        description: What is shifted, and which ImageNet variant it stands for.
        stream: Its random stream (distinct from every other dataset's).
        gains: The light's channel gains.
        forced: Nuisance factors every image has (`shapes.Factors` field -> value).
        every: Keep every `every`-th class (2: 24 of the 48, as -A and -R keep 200 of 1000).
    """

    description: str
    stream: int
    gains: tuple[float, float, float] = LIGHTS[DATASET_LIGHT]
    forced: dict[str, object] = field(default_factory=dict)
    every: int = 1


DOMAINS: dict[str, Domain] = {
    "v2": Domain("a fresh draw of the test distribution (ImageNet-V2)", 10),
    "sketch": Domain("every object drawn as loose strokes (ImageNet-Sketch)", 11, forced={"style": "sketch"}),
    "hard": Domain("small, blurred objects; every other class (ImageNet-A)", 12,
                   forced={"size": "small", "blur": True}, every=2),
    "rendition": Domain("outlines under a cool light; every other class (ImageNet-R)", 13, gains=COOL_LIGHT,
                        forced={"style": "outline"}, every=2),
}


@dataclass(frozen=True)
class TargetKind:
    """A cross-dataset target: which attribute of a scene is its class."""

    description: str
    stream: int
    classnames: tuple[str, ...]
    test_per_class: int  # more test images per class than toy-shapes' 20: few classes, steadier accuracy


COLOUR_NAMES = tuple(sorted(COLOURS))
TARGETS: dict[str, TargetKind] = {
    "toy-colours": TargetKind("8 colour classes, any shape (a cross-dataset target of toy-shapes)", 20,
                              COLOUR_NAMES, 60),
    "toy-forms": TargetKind("6 shape classes, any colour (a cross-dataset target of toy-shapes)", 21,
                            tuple(sorted(SHAPES)), 60),
}


def _rng(stream: int, split: str, index: int, seed: int) -> np.random.Generator:
    """One stream per image of one target; four entries, so never one of toy-shapes' three-entry streams."""
    return np.random.default_rng([seed, stream, _SPLIT_STREAMS[split], index])


class _ToyTarget(ImageDataset):
    """One split of a transfer target; images drawn when loaded."""

    def __init__(self, name: str, classnames: list[str], per_class: int, split: str, seed: int):
        if split not in SPLIT_SIZES:
            raise unknown_name_error(f"{name} split", split, SPLIT_SIZES)
        self.name, self.split, self.seed = name, split, seed
        self.classnames = classnames
        self.labels = [i % len(classnames) for i in range(per_class * len(classnames))]

    def describe(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"{self.name}/{self.split} has {len(self.labels)} images, no index {index}")


class ShiftedShapes(_ToyTarget):
    """toy-shapes' classes (all, or every `Domain.every`-th) in a shifted domain."""

    def __init__(self, domain: str, split: str = "test", seed: int = 0):
        if domain not in DOMAINS:
            raise unknown_name_error("toy-shapes domain", domain, DOMAINS)
        self.domain = DOMAINS[domain]
        self.source_labels = list(range(0, len(CLASSNAMES), self.domain.every))
        super().__init__(f"toy-shapes:{domain}", [CLASSNAMES[i] for i in self.source_labels],
                         SPLIT_SIZES.get(split, 0), split, seed)

    def load(self, index: int) -> Image.Image:
        self._check(index)
        rng = _rng(self.domain.stream, self.split, index, self.seed)
        factors = replace(_draw_factors(rng), **self.domain.forced)
        colour, shape = self.classnames[self.labels[index]].split(" ")
        return draw_scene(rng, factors, colour, shape, self.domain.gains)


class ToyTarget(_ToyTarget):
    """A cross-dataset target (`TARGETS`): one attribute of the scene is the class, the other random."""

    def __init__(self, name: str, split: str = "test", seed: int = 0):
        self.kind = TARGETS[name]
        per_class = self.kind.test_per_class if split == "test" else SPLIT_SIZES.get(split, 0)
        super().__init__(name, list(self.kind.classnames), per_class, split, seed)

    def load(self, index: int) -> Image.Image:
        self._check(index)
        rng = _rng(self.kind.stream, self.split, index, self.seed)
        factors = _draw_factors(rng)
        label = self.classnames[self.labels[index]]
        if label in COLOURS:
            colour, shape = label, SHAPES[int(rng.integers(len(SHAPES)))]
        else:
            colour, shape = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], label
        return draw_scene(rng, factors, colour, shape, LIGHTS[DATASET_LIGHT])


def _target_source(name: str) -> DatasetSource:
    return DatasetSource(name, f"toy world: {TARGETS[name].description} (no path)",
                         lambda _argument, options: ToyTarget(name, split=options.split), needs_argument=False)


COLOURS_SOURCE = _target_source("toy-colours")
FORMS_SOURCE = _target_source("toy-forms")


def load_shifted(domain: str, options: DatasetOptions) -> ShiftedShapes:
    """``toy-shapes:DOMAIN`` (what `shapes.SOURCE` builds when given an argument)."""
    return ShiftedShapes(domain, split=options.split)
