"""The 11 base-to-new datasets in the CoOp/Dassl layout, read in place under one ROOT.

Researchers already keep these datasets as CoOp's ``DATASETS.md`` describes; reading that
layout directly (split files, labels and class names exactly as CoOp does) makes results
comparable with published numbers without any conversion step.

Nine datasets carry ``<folder>/split_zhou_<Name>.json`` (``train``/``val``/``test`` lists of
``[relative_path, label, class_name]``). fgvc_aircraft and imagenet have their own layouts;
see `_load_aircraft` and `_load_imagenet`. As in CoOp's prompt learners, underscores in class
names become spaces.

The four domain-generalisation targets (ImageNet-V2, -Sketch, -A, -R) are test sets only, each
with a copy of ImageNet's ``classnames.txt`` (`_load_imagenet_variant`). -A and -R hold 200 of
ImageNet's classes: as in CoOp, their labels are 0..199 (the sorted wnid folders) and they are
scored with their own 200 class names; ``source_labels`` records each class's ImageNet label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import read_user_text
from ..names import unknown_name_error
from . import DatasetOptions, DatasetSource
from .base import ImageDataset
from .images import FileDataset

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


@dataclass(frozen=True)
class _ImageNetVariant:
    """Where an ImageNet test variant lives under ROOT (CoOp's ``DATASETS.md``)."""

    folder: str
    image_dir: str  # inside `folder`
    numbered: bool  # class folders named 0..999 (the classnames.txt line) instead of by wnid


_IMAGENET_VARIANTS = {
    "imagenetv2": _ImageNetVariant("imagenetv2", "imagenetv2-matched-frequency-format-val", numbered=True),
    "imagenet_sketch": _ImageNetVariant("imagenet-sketch", "images", numbered=False),
    "imagenet_a": _ImageNetVariant("imagenet-adversarial", "imagenet-a", numbered=False),
    "imagenet_r": _ImageNetVariant("imagenet-rendition", "imagenet-r", numbered=False),
}
COOP_DATASETS = (*_SPLIT_FILE_DATASETS, "fgvc_aircraft", "imagenet", *_IMAGENET_VARIANTS)


class CoopDataset(FileDataset):
    """A list of image files with labels; decoding waits for `load`."""

    def __init__(self, name: str, classnames: list[str], paths: list[Path], labels: list[int],
                 source_labels: list[int] | None = None):
        self.name = name
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.paths = paths
        self.labels = labels
        self.source_labels = source_labels


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
    if name in _IMAGENET_VARIANTS:
        if split != "test":
            raise UserError(f"coop:{name} is a test set only (CoOp evaluates on it, never trains): use --split test")
        return _load_imagenet_variant(spec, root, _IMAGENET_VARIANTS[name])
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
    names = _read_classnames(folder)
    split_dir = _require(folder / "images" / ("val" if split == "test" else "train"), "image folder")
    wnids = _class_folders(split_dir, names, folder)
    paths, labels = _images_by_label(split_dir, wnids)
    return CoopDataset(spec, [names[w] for w in wnids], paths, labels)


def _read_classnames(folder: Path) -> dict[str, str]:
    """``classnames.txt``: ``<wnid> <class name…>`` per line, in file order."""
    names = {}
    for line in read_user_text(_require(folder / "classnames.txt", "class list"), "class list").splitlines():
        wnid, _, classname = line.strip().partition(" ")
        if wnid:
            names[wnid] = classname.strip()
    return names


def _class_folders(split_dir: Path, names: dict[str, str], folder: Path) -> list[str]:
    """The sorted wnid folders of `split_dir` (files such as -A's README.txt are not classes)."""
    wnids = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise UserError(f"folder '{split_dir / unknown[0]}' is not listed in {folder / 'classnames.txt'}")
    return wnids


def _images_by_label(split_dir: Path, folders: list[str], folder_labels: list[int] | None = None
                     ) -> tuple[list[Path], list[int]]:
    """The sorted image files of each class folder and their labels: `folder_labels`, else each
    folder's position in `folders`."""
    paths, labels = [], []
    for name, label in zip(folders, folder_labels or range(len(folders))):
        files = sorted(p for p in (split_dir / name).iterdir() if p.is_file() and not p.name.startswith("."))
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _load_imagenet_variant(spec: str, root: Path, layout: _ImageNetVariant) -> CoopDataset:
    """An ImageNet test variant, read as CoOp reads it.

    -Sketch, -A and -R: one folder per wnid, labels = index of the sorted folders (so -A and -R
    have labels 0..199 over their 200 classes), names from ``classnames.txt``. -V2: folders
    ``0``..``999``, folder k holding the class on line k of ``classnames.txt``; all of its classes
    are scored. ``source_labels`` maps each class to its ImageNet label (its wnid's position
    among the sorted wnids of ``classnames.txt``, as `_load_imagenet` numbers ImageNet's classes).
    """
    folder = root / layout.folder
    names = _read_classnames(folder)
    image_dir = _require(folder / layout.image_dir, "image folder")
    imagenet_label = {wnid: i for i, wnid in enumerate(sorted(names))}
    if not layout.numbered:
        wnids = _class_folders(image_dir, names, folder)
        paths, labels = _images_by_label(image_dir, wnids)
        return CoopDataset(spec, [names[w] for w in wnids], paths, labels, [imagenet_label[w] for w in wnids])
    wnids = list(names)
    present = [d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if bad := [d for d in present if not d.isdigit() or int(d) >= len(wnids)]:
        raise UserError(f"folder '{image_dir / bad[0]}' is not a class number 0..{len(wnids) - 1} of "
                        f"{folder / 'classnames.txt'}")
    numbers = sorted(present, key=int)
    paths, labels = _images_by_label(image_dir, numbers, [int(n) for n in numbers])
    return CoopDataset(spec, [names[w] for w in wnids], paths, labels, [imagenet_label[w] for w in wnids])


def _load_source(argument: str, options: DatasetOptions) -> ImageDataset:
    name, sep, root = argument.partition("@")
    if not sep or not root:
        raise UserError(f"coop dataset spec must be coop:NAME@ROOT, got 'coop:{argument}'")
    return load_coop(name, root, split=options.split)


SOURCE = DatasetSource("coop:NAME@ROOT", "a CoOp/Dassl-layout dataset (oxford_pets, dtd, imagenet, imagenet_a, ...)",
                       _load_source)
