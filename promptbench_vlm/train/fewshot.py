"""Few-shot sampling as CoOp does it: K images per class, drawn with the seed, cached as JSON."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections import Counter, defaultdict
from pathlib import Path

from ..data.base import ImageDataset, SubsetDataset
from ..errors import InputWarning
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
    so every method trained on the same seed sees exactly the same images. An entry is used only
    when it was written for this dataset, K and seed, its checksum matches its indices (a
    hand-edited entry does not) and it holds min(K, n) images of every class; any other entry
    is redrawn with a warning (an `InputWarning`).
    """
    if shots <= 0:
        return dataset
    fingerprint = dataset.fingerprint()
    indices = None
    cache = Path(cache_dir) / f"{fingerprint}_shot{shots}_seed{seed}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        indices, problem = _read_entry(cache, dataset, fingerprint, shots, seed)
        if problem:
            warnings.warn(f"few-shot cache entry {cache} {problem}; drawing the {shots}-shot split of seed {seed} "
                          "again", InputWarning, stacklevel=2)
    if indices is None:
        indices = sample_indices(dataset.labels, shots, seed)
        if cache is not None:
            entry = {"dataset": dataset.name, "fingerprint": fingerprint, "shots": shots, "seed": seed,
                     "indices": indices, "checksum": _checksum(indices)}
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(entry))
    return SubsetDataset(dataset, indices, range(len(dataset.classnames)), f"{shots}shot-seed{seed}")


def _checksum(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]


def _read_entry(path: Path, dataset: ImageDataset, fingerprint: str, shots: int, seed: int
                ) -> tuple[list[int] | None, str | None]:
    """The indices of a few-shot cache entry, or None and what is wrong with it."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"cannot be read ({type(err).__name__})"
    if not isinstance(entry, dict) or (entry.get("fingerprint"), entry.get("shots"), entry.get("seed")) != (
            fingerprint, shots, seed):
        return None, "was not written for this dataset, shot count and seed"
    indices = entry.get("indices")
    if not (isinstance(indices, list) and all(type(i) is int for i in indices)) or entry.get("checksum") != _checksum(
            indices):
        return None, "does not match its checksum (edited or damaged)"
    if len(set(indices)) != len(indices) or any(not 0 <= i < len(dataset) for i in indices):
        return None, "holds indices outside the dataset"
    per_class = Counter(dataset.labels[i] for i in indices)
    if per_class != Counter({c: min(shots, n) for c, n in Counter(dataset.labels).items()}):
        return None, f"does not hold min({shots}, n) images of every class"
    return indices, None
