"""Dataset sources, chosen by a spec string.

| spec | source |
|---|---|
| ``toy-shapes`` | the embedded procedural toy world (`promptbench_vlm.toy.shapes`) |
| ``folder:PATH`` | an image folder, one sub-folder per class (`data.folder`) |
| ``coop:NAME@ROOT`` | one of the 11 CoOp/Dassl datasets under ROOT (`data.coop`) |
| ``hf:NAME`` | a Hugging Face hub dataset, `datasets.load_dataset` (`data.hf`) |
| ``hf-disk:PATH`` | a dataset saved with `save_to_disk` (`data.hf`) |
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..names import unknown_name_error
from .base import SUBSETS, CorruptImageError, ImageDataset, select_subset

SOURCES = {
    "toy-shapes": "the embedded procedural toy world (no path)",
    "folder": "folder:PATH - an image folder, one sub-folder per class",
    "coop": "coop:NAME@ROOT - a CoOp/Dassl-layout dataset (oxford_pets, dtd, imagenet, ...)",
    "hf": "hf:NAME - a Hugging Face hub dataset (needs network or a local cache)",
    "hf-disk": "hf-disk:PATH - a Hugging Face dataset saved with save_to_disk",
}


@dataclass(frozen=True)
class DatasetOptions:
    """Options shared by the sources; each source reads the ones it needs."""

    split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    trust_remote_code: bool = False


def load_dataset(spec: str, options: DatasetOptions | None = None, subset: str = "all") -> ImageDataset:
    """Build the dataset named by `spec` (see the module table), then select `subset`.

    Raises:
        UserError: for an unknown source, a missing path, or an empty dataset.
    """
    options = options or DatasetOptions()
    kind, _, arg = spec.partition(":")
    if kind == "toy-shapes":
        from ..toy.shapes import ToyShapes

        dataset: ImageDataset = ToyShapes(split=options.split)
    elif kind == "folder" and arg:
        from .folder import FolderDataset

        dataset = FolderDataset(arg, split=options.split)
    elif kind == "coop" and arg:
        from .coop import load_coop

        name, sep, root = arg.partition("@")
        if not sep or not root:
            raise UserError(f"coop dataset spec must be coop:NAME@ROOT, got '{spec}'")
        dataset = load_coop(name, root, split=options.split)
    elif kind in ("hf", "hf-disk") and arg:
        from .hf import load_hf

        dataset = load_hf(arg, options, from_disk=kind == "hf-disk")
    elif kind in SOURCES:
        raise UserError(f"dataset spec '{spec}' needs an argument: {SOURCES[kind]}")
    else:
        raise unknown_name_error("dataset source", kind, SOURCES)
    if len(dataset) == 0:
        raise UserError(f"dataset '{spec}' (split '{options.split}') has no images")
    return select_subset(dataset, subset)


__all__ = [
    "SOURCES",
    "SUBSETS",
    "CorruptImageError",
    "DatasetOptions",
    "ImageDataset",
    "load_dataset",
    "select_subset",
]
