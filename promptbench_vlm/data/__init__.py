"""Dataset sources, chosen by a spec string ``KIND`` or ``KIND:ARGUMENT``.

Each kind is a `DatasetSource` registered in `DATASET_SOURCES` (entry-point group
``promptbench_vlm.datasets``), found by name like a learner: this module names none of them and
imports none of their code. The shipped ones:

| spec | source |
|---|---|
| ``toy-shapes`` | the embedded procedural toy world (`promptbench_vlm.toy.shapes`) |
| ``toy-shapes:DOMAIN`` | its classes in a shifted domain: v2, sketch, hard, rendition (`promptbench_vlm.toy.transfer`) |
| ``toy-colours``, ``toy-forms`` | toy scenes classed by colour or by shape: cross-dataset targets (`toy.transfer`) |
| ``folder:PATH`` | an image folder, one sub-folder per class (`data.folder`) |
| ``coop:NAME@ROOT`` | one of the 11 CoOp/Dassl datasets under ROOT (`data.coop`) |
| ``hf:NAME`` | a Hugging Face hub dataset, `datasets.load_dataset` (`data.hf`) |
| ``hf-disk:PATH`` | a dataset saved with `save_to_disk` (`data.hf`) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..registry import Registry
from .base import SUBSETS, CorruptImageError, ImageDataset, select_subset


@dataclass(frozen=True)
class DatasetOptions:
    """Options shared by the sources; each source reads the ones it needs."""

    split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DatasetSource:
    """One kind of dataset spec.

    Attributes:
        usage: How its spec is written (``folder:PATH``), for messages and listings.
        description: One line for ``promptbench list datasets``.
        load: ``load(argument, options)`` builds the dataset; the argument is what follows the
            colon (empty for a source without one).
        needs_argument: Whether a spec without ``:ARGUMENT`` is refused.
    """

    usage: str
    description: str
    load: Callable[[str, DatasetOptions], ImageDataset]
    needs_argument: bool = True


DATASET_SOURCES: Registry[DatasetSource] = Registry("promptbench_vlm.datasets", "dataset source", builtin={
    "toy-shapes": "promptbench_vlm.toy.shapes:SOURCE",
    "toy-colours": "promptbench_vlm.toy.transfer:COLOURS_SOURCE",
    "toy-forms": "promptbench_vlm.toy.transfer:FORMS_SOURCE",
    "folder": "promptbench_vlm.data.folder:SOURCE",
    "coop": "promptbench_vlm.data.coop:SOURCE",
    "hf": "promptbench_vlm.data.hf:HUB_SOURCE",
    "hf-disk": "promptbench_vlm.data.hf:DISK_SOURCE",
})


def load_dataset(spec: str, options: DatasetOptions | None = None, subset: str = "all") -> ImageDataset:
    """Build the dataset named by `spec` (``KIND`` or ``KIND:ARGUMENT``), then select `subset`.

    Raises:
        UserError: for an unknown source, a missing argument or path, or an empty dataset.
    """
    options = options or DatasetOptions()
    kind, _, argument = spec.partition(":")
    source = DATASET_SOURCES.get(kind)
    if source.needs_argument and not argument:
        raise UserError(f"dataset spec '{spec}' needs an argument: {source.usage} - {source.description}")
    dataset = source.load(argument, options)
    if len(dataset) == 0:
        raise UserError(f"dataset '{spec}' (split '{options.split}') has no images")
    return select_subset(dataset, subset)


__all__ = [
    "DATASET_SOURCES",
    "SUBSETS",
    "CorruptImageError",
    "DatasetOptions",
    "DatasetSource",
    "ImageDataset",
    "load_dataset",
    "select_subset",
]
