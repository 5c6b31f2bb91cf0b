"""The one dataset interface every source (toy world, image folder, CoOp layout, HF) provides.

A source yields labelled images lazily: the evaluator decides batching and preprocessing.
Corrupt images raise `CorruptImageError` from `load`, so the evaluator can skip and count them.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


class CorruptImageError(Exception):
    """An image that cannot be decoded; the evaluator reports and skips it."""


class ImageDataset(ABC):
    """A labelled image collection for one split.

    Attributes:
        name: Source spec that built it (e.g. ``"folder:/data/pets"``), for the result file.
        classnames: Class names indexed by label; labels are ``0..len(classnames)-1``.
        labels: The label of each image, in order.
    """

    name: str
    classnames: list[str]
    labels: list[int]
    split_ignored: bool = False
    """True for a source that serves every split from the same images (a flat image folder)."""
    source_labels: list[int] | None = None
    """For a test set of another dataset's classes (ImageNet-A and -R, ``toy-shapes:hard``): that
    dataset's label of each class; None when the dataset stands alone."""

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Return image `index` as an RGB PIL image; raise `CorruptImageError` if unreadable."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """A short human-readable locator for image `index` (a path, a row number)."""

    def identity(self, index: int) -> str:
        """What tells image `index` apart from any other image anywhere: by default its locator.
        File-backed sources give the resolved absolute path, size and modification time."""
        return self.describe(index)

    def fingerprint(self) -> str:
        """A stable hash of what the dataset holds (names, classes, labels, image identities).

        Two datasets share a fingerprint, and so feature-cache and few-shot entries, only when
        they hold the same images: the same spec string typed in two projects does not suffice.
        Computed once per dataset object.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256()
            h.update(self.name.encode())
            h.update("\x00".join(self.classnames).encode())
            for i, label in enumerate(self.labels):
                h.update(f"{label}:{self.identity(i)}\n".encode())
            cached = self.__dict__["_fingerprint"] = h.hexdigest()[:16]
        return cached


def file_identity(path: Path) -> str:
    """A file's resolved absolute path, size and modification time (``missing`` if absent): a
    file replaced, edited or moved gets another identity."""
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return f"{resolved}:missing"
    return f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"


class SubsetDataset(ImageDataset):
    """A view of some images of a parent dataset, with classes renumbered from 0."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int], class_ids: Sequence[int], tag: str):
        remap = {old: new for new, old in enumerate(class_ids)}
        self.parent = parent
        self.indices = list(indices)
        self.name = f"{parent.name}[{tag}]"
        self.classnames = [parent.classnames[c] for c in class_ids]
        self.labels = [remap[parent.labels[i]] for i in self.indices]
        self.split_ignored = parent.split_ignored
        self.source_labels = [parent.source_labels[c] for c in class_ids] if parent.source_labels else None

    def load(self, index: int) -> Image.Image:
        return self.parent.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.parent.describe(self.indices[index])

    def identity(self, index: int) -> str:
        return self.parent.identity(self.indices[index])


SUBSETS = ("all", "base", "new")


@dataclass(frozen=True)
class BaseNewSplit:
    """The CoOp/Dassl base/new rule: labels sorted, base = first ceil(C/2), new = the rest."""

    base: tuple[int, ...]
    new: tuple[int, ...]

    @classmethod
    def for_classes(cls, n_classes: int) -> BaseNewSplit:
        m = math.ceil(n_classes / 2)
        return cls(tuple(range(m)), tuple(range(m, n_classes)))


def select_subset(dataset: ImageDataset, subset: str) -> ImageDataset:
    """Return the `subset` ("all", "base" or "new") of `dataset`, labels renumbered from 0."""
    if subset == "all":
        return dataset
    if subset not in SUBSETS:
        from ..names import unknown_name_error

        raise unknown_name_error("subset", subset, SUBSETS)
    split = BaseNewSplit.for_classes(len(dataset.classnames))
    class_ids = split.base if subset == "base" else split.new
    keep = set(class_ids)
    indices = [i for i, label in enumerate(dataset.labels) if label in keep]
    return SubsetDataset(dataset, indices, class_ids, subset)
