"""Tasks for MAML meta-prompt training: which classes form a task and how its images split.

A task is a set of classes from one source dataset. Each epoch partitions every source's classes
at random into disjoint tasks; each task then splits each class's few-shot images into a support
set (K shots) and a query set (the rest), disjointly, afresh at every meta-step.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..data.base import ImageDataset
from ..errors import UserError


class JointDataset(ImageDataset):
    """Several datasets side by side (several ``--dataset``), class ids offset per part.

    Attributes:
        class_sources: The index of the part each class comes from; meta-learning draws its
            tasks within one part, so a task never mixes datasets.
    """

    def __init__(self, parts: Sequence[ImageDataset]):
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.classnames, self.labels, self.class_sources = [], [], []
        self._where: list[tuple[int, int]] = []
        for k, part in enumerate(self.parts):
            offset = len(self.classnames)
            self.classnames += part.classnames
            self.class_sources += [k] * len(part.classnames)
            self.labels += [offset + label for label in part.labels]
            self._where += [(k, i) for i in range(len(part))]

    def load(self, index: int) -> Image.Image:
        k, i = self._where[index]
        return self.parts[k].load(i)

    def describe(self, index: int) -> str:
        k, i = self._where[index]
        return f"{self.parts[k].name}/{self.parts[k].describe(i)}"


@dataclass(frozen=True)
class TaskSplit:
    """One task's images for one meta-step: dataset indices and task-local labels (0..n-1)."""

    classes: tuple[int, ...]
    support: tuple[int, ...]
    support_labels: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]


def partition_classes(class_sources: Sequence[int], task_classes: int, rng: random.Random) -> list[list[int]]:
    """Disjoint tasks covering every source's classes once, in random order.

    Each source's classes are shuffled and cut into chunks of `task_classes` (0: the whole source
    is one task). A final chunk of one class is folded into the previous one: a one-class task has
    a constant zero cross-entropy and teaches nothing.
    """
    by_source: dict[int, list[int]] = defaultdict(list)
    for c, s in enumerate(class_sources):
        by_source[s].append(c)
    tasks: list[list[int]] = []
    for s in sorted(by_source):
        classes = by_source[s][:]
        rng.shuffle(classes)
        size = task_classes or len(classes)
        chunks = [classes[i:i + size] for i in range(0, len(classes), size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()
            chunks[-1] += last
        tasks += [sorted(chunk) for chunk in chunks if len(chunk) > 1]
    if not tasks:
        raise UserError("maml-clip needs at least 2 training classes per task source")
    rng.shuffle(tasks)
    return tasks


def images_by_class(labels: Sequence[int], indices: Sequence[int]) -> dict[int, list[int]]:
    """The dataset indices among `indices` (the readable images) of each class."""
    out: dict[int, list[int]] = defaultdict(list)
    for i in indices:
        out[labels[i]].append(i)
    return out


def split_task(classes: Sequence[int], by_class: dict[int, list[int]], support_shots: int,
               rng: random.Random) -> TaskSplit:
    """Split each class's images at random into K support and the rest as query; never shared.

    Raises:
        UserError: a class has no image left for the query set.
    """
    support, support_labels, query, query_labels = [], [], [], []
    for local, c in enumerate(classes):
        items = by_class.get(c, [])
        if len(items) <= support_shots:
            raise UserError(f"maml-clip: class {c} has {len(items)} training images; a task needs more than "
                            f"support_shots={support_shots} (raise --shots or lower support_shots)")
        order = rng.sample(items, len(items))
        support += order[:support_shots]
        query += order[support_shots:]
        support_labels += [local] * support_shots
        query_labels += [local] * (len(items) - support_shots)
    return TaskSplit(tuple(classes), tuple(support), tuple(support_labels), tuple(query), tuple(query_labels))


def draw_batches(indices: Sequence[int], labels: Sequence[int], size: int, count: int, rng: random.Random
                 ) -> list[tuple[list[int], list[int]]]:
    """`count` batches of `size` from one shuffled pass, wrapping around (0 or a size >= the set
    gives the whole set each time): the inner steps walk through the support set like epochs."""
    pairs = list(zip(indices, labels))
    if size <= 0 or size >= len(pairs):
        return [([i for i, _ in pairs], [y for _, y in pairs]) for _ in range(count)]
    order = rng.sample(pairs, len(pairs))
    out = []
    for k in range(count):
        chunk = [order[(k * size + j) % len(order)] for j in range(size)]
        out.append(([i for i, _ in chunk], [y for _, y in chunk]))
    return out
