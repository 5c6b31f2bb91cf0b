"""Few-shot sampling as CoOp does it: K images per class, drawn with the seed, cached as JSON."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from ..data.base import ImageDataset, SubsetDataset
from ..files import atomic_path, cache_root

DEFAULT_CACHE = cache_root() / "fewshot"


def sample_indices(labels: list[int], shots: int, seed: int) -> list[int]:
    """Per class in label order, ``random.sample(items, min(K, n))`` from one seeded stream."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        items = by_class[label]
        chosen += sorted(rng.sample(items, min(shots, len(items))))
    return chosen


def few_shot(dataset: ImageDataset, shots: int, seed: int, cache_dir: Path | None = DEFAULT_CACHE) -> ImageDataset:
    """The K-shot subset of `dataset` for `seed`; `shots <= 0` keeps every image.

    The chosen indices are cached per (dataset fingerprint, K, seed) as JSON (never a pickle),
    so every method trained on the same seed sees exactly the same images.
    """
    if shots <= 0:
        return dataset
    indices = None
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{dataset.fingerprint()}_shot{shots}_seed{seed}.json"
        if cache.is_file():
            try:
                indices = json.loads(cache.read_text())["indices"]
            except (OSError, ValueError, KeyError):
                indices = None  # a broken cache entry is rebuilt
    if indices is None or any(not 0 <= i < len(dataset) for i in indices):
        indices = sample_indices(dataset.labels, shots, seed)
        if cache is not None:
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps({"dataset": dataset.name, "shots": shots, "seed": seed, "indices": indices}))
    return SubsetDataset(dataset, indices, range(len(dataset.classnames)), f"{shots}shot-seed{seed}")
