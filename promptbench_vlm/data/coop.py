"""The 11 base-to-new datasets in the CoOp/Dassl layout, read in place under one ROOT.

Researchers already keep these datasets as CoOp's ``DATASETS.md`` describes; reading that
layout directly (split files, labels and class names exactly as CoOp does) makes results
comparable with published numbers without any conversion step.

Nine datasets carry ``<folder>/split_zhou_<Name>.json`` (``train``/``val``/``test`` lists of
``[relative_path, label, class_name]``). fgvc_aircraft and imagenet have their own layouts;
see `_load_aircraft` and `_load_imagenet`. As in CoOp's prompt learners, underscores in class
names become spaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..files import read_user_text
from ..names import unknown_name_error
from . import DatasetOptions, DatasetSource
from .base import ImageDataset, file_identity
from .images import open_rgb

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _SplitFileLayout:
    """Where a split-file dataset lives under ROOT."""

    folder: str
    image_dir: str  # relative to ROOT; the split file's paths are relative to it
    split_file: str  # inside `folder`


_SPLIT_FILE_DATASETS = {
    "caltech101": _SplitFileLayout("caltech-101", "caltech-101/101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": _SplitFileLayout("oxford_pets", "oxford_pets/images", "split_zhou_OxfordPets.json"),
    "stanford_cars": _SplitFileLayout("stanford_cars", "stanford_cars", "split_zhou_StanfordCars.json"),
    "oxford_flowers": _SplitFileLayout("oxford_flowers", "oxford_flowers/jpg", "split_zhou_OxfordFlowers.json"),
    "food101": _SplitFileLayout("food-101", "food-101/images", "split_zhou_Food101.json"),
    "sun397": _SplitFileLayout("sun397", "sun397/SUN397", "split_zhou_SUN397.json"),
    "dtd": _SplitFileLayout("dtd", "dtd/images", "split_zhou_DescribableTextures.json"),
    "eurosat": _SplitFileLayout("eurosat", "eurosat/2750", "split_zhou_EuroSAT.json"),
    "ucf101": _SplitFileLayout("ucf101", "ucf101/UCF-101-midframes", "split_zhou_UCF101.json"),
}
COOP_DATASETS = (*_SPLIT_FILE_DATASETS, "fgvc_aircraft", "imagenet")


class CoopDataset(ImageDataset):
    """A list of image files with labels; decoding waits for `load`."""

    def __init__(self, name: str, classnames: list[str], paths: list[Path], labels: list[int]):
        self.name = name
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.paths = paths
        self.labels = labels

    def load(self, index: int) -> Image.Image:
        return open_rgb(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def identity(self, index: int) -> str:
        return file_identity(self.paths[index])


def load_coop(name: str, root: str | Path, split: str) -> ImageDataset:
    """Read split `split` ("train", "val" or "test") of CoOp dataset `name` under `root`.

    imagenet has no validation split of its own: CoOp uses ``images/val`` as the test set
    (and reuses it as val), so here "test" reads ``images/val``, "train" reads
    ``images/train``, and "val" is refused rather than silently returning the test images.

    Raises:
        UserError: for an unknown dataset or split, or a missing or malformed file or folder.
    """
    if name not in COOP_DATASETS:
        raise unknown_name_error("CoOp dataset", name, COOP_DATASETS)
    if split not in SPLITS:
        raise unknown_name_error(f"split for coop:{name}", split, SPLITS)
    spec = f"coop:{name}@{root}"
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"CoOp data root '{root}' does not exist or is not a folder")
    if name == "fgvc_aircraft":
        return _load_aircraft(spec, root / "fgvc_aircraft", split)
    if name == "imagenet":
        return _load_imagenet(spec, root / "imagenet", split)
    return _load_split_file(spec, root, _SPLIT_FILE_DATASETS[name], split)


def _require(path: Path, what: str) -> Path:
    """Return `path`, or fail saying which file or folder the layout expects there."""
    if not path.exists():
        raise UserError(f"missing {what}: expected '{path}' (CoOp/Dassl layout, see docs/datasets.md)")
    return path


def _load_split_file(spec: str, root: Path, layout: _SplitFileLayout, split: str) -> CoopDataset:
    """Read one split of a ``split_zhou_*.json`` dataset; class names come from all splits."""
    split_path = _require(root / layout.folder / layout.split_file, "split file")
    image_dir = _require(root / layout.image_dir, "image folder")
    try:
        splits = json.loads(read_user_text(split_path, "split file"))
        entries = {s: [(str(p), int(y), str(c)) for p, y, c in splits[s]] for s in SPLITS}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"split file '{split_path}' is not valid JSON: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"split file '{split_path}' must map train/val/test to lists of [path, label, class name] ({err!r})"
        ) from err
    names: dict[int, str] = {}
    for _, label, classname in (e for s in SPLITS for e in entries[s]):
        if names.setdefault(label, classname) != classname:
            raise UserError(f"split file '{split_path}': label {label} is both '{names[label]}' and '{classname}'")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"split file '{split_path}': labels are not 0..{len(names) - 1}")
    chosen = entries[split]
    return CoopDataset(
        spec,
        [names[i] for i in range(len(names))],
        [image_dir / p for p, _, _ in chosen],
        [y for _, y, _ in chosen],
    )


def _load_aircraft(spec: str, folder: Path, split: str) -> CoopDataset:
    """fgvc_aircraft: variants.txt (label = line index) + ``images_variant_<split>.txt``."""
    variants = read_user_text(_require(folder / "variants.txt", "class list"), "class list").splitlines()
    classnames = [line.strip() for line in variants if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    list_path = _require(folder / f"images_variant_{split}.txt", "split file")
    image_dir = _require(folder / "images", "image folder")
    paths, labels = [], []
    for n, line in enumerate(read_user_text(list_path, "split file").splitlines(), start=1):
        image_id, _, classname = line.strip().partition(" ")
        if not image_id:
            continue
        if classname not in label_of:
            raise UserError(f"{list_path}:{n}: class '{classname}' is not in {folder / 'variants.txt'}")
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(label_of[classname])
    return CoopDataset(spec, classnames, paths, labels)


def _load_imagenet(spec: str, folder: Path, split: str) -> CoopDataset:
    """imagenet: ``images/{train,val}/<wnid>/``, labels = index of the sorted wnid folders."""
    if split == "val":
        raise UserError(
            "coop:imagenet has no separate 'val' split: its images/val folder is the test set "
            "(use --split test, or --split train)"
        )
    names = {}
    for line in read_user_text(_require(folder / "classnames.txt", "class list"), "class list").splitlines():
        wnid, _, classname = line.strip().partition(" ")
        if wnid:
            names[wnid] = classname.strip()
    split_dir = _require(folder / "images" / ("val" if split == "test" else "train"), "image folder")
    wnids = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise UserError(f"folder '{split_dir / unknown[0]}' is not listed in {folder / 'classnames.txt'}")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        files = sorted(p for p in (split_dir / wnid).iterdir() if p.is_file() and not p.name.startswith("."))
        paths += files
        labels += [label] * len(files)
    return CoopDataset(spec, [names[w] for w in wnids], paths, labels)


def _load_source(argument: str, options: DatasetOptions) -> ImageDataset:
    name, sep, root = argument.partition("@")
    if not sep or not root:
        raise UserError(f"coop dataset spec must be coop:NAME@ROOT, got 'coop:{argument}'")
    return load_coop(name, root, split=options.split)


SOURCE = DatasetSource("coop:NAME@ROOT", "a CoOp/Dassl-layout dataset (oxford_pets, dtd, imagenet, ...)", _load_source)
