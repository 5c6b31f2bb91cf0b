"""Hugging Face datasets: from the hub (``hf:NAME``) or saved with ``save_to_disk`` (``hf-disk:PATH``).

`datasets` is imported inside the functions: it is slow to import and only these sources need it.

Images are read with automatic decoding turned off and decoded by `open_rgb`, so a corrupt
image raises `CorruptImageError` for that row instead of failing inside `datasets`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import UserError
from . import DatasetSource
from .base import CorruptImageError, ImageDataset, file_identity
from .images import open_rgb

if TYPE_CHECKING:
    import datasets

    from . import DatasetOptions

_PATH_OR_BYTES_DTYPES = ("string", "large_string", "binary", "large_binary")


def load_hf(name_or_path: str, options: DatasetOptions, from_disk: bool) -> ImageDataset:
    """Load split ``options.split`` of a hub dataset, or of a dataset saved on disk.

    Raises:
        UserError: if the dataset cannot be loaded (offline, unknown name, missing split) or
            lacks the image or label column.
    """
    if from_disk:
        table = _load_from_disk(name_or_path, options.split)
        spec = f"hf-disk:{name_or_path}"
    else:
        table = _load_from_hub(name_or_path, options)
        spec = f"hf:{name_or_path}"
    return HFDataset(table, spec, options.image_column, options.label_column)


def _load_from_hub(name: str, options: DatasetOptions) -> datasets.Dataset:
    """`datasets.load_dataset`, with every failure turned into one line that says what to do.

    ``trust_remote_code`` is passed only when the user asked for it and the installed
    `datasets` still has the parameter (datasets 4 dropped loading scripts and the flag).
    """
    import datasets

    kwargs: dict[str, Any] = {}
    if options.trust_remote_code and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(name, split=options.split, **kwargs)
    except ConnectionError as err:
        raise UserError(
            f"cannot reach the Hugging Face hub for dataset '{name}' ({_first_line(err)}); for a local copy, "
            f"run datasets.load_dataset('{name}', split='{options.split}').save_to_disk(PATH) where there "
            "is network and use hf-disk:PATH"
        ) from err
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetsError) as err:
        raise UserError(
            f"cannot load Hugging Face dataset '{name}' split '{options.split}': {_first_line(err)} "
            "(for a local copy saved with save_to_disk, use hf-disk:PATH)"
        ) from err


def _load_from_disk(path: str, split: str) -> datasets.Dataset:
    """`datasets.load_from_disk`; a DatasetDict gives `split`, a single Dataset is used as is."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load saved Hugging Face dataset '{path}': {_first_line(err)}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"saved dataset '{path}' has no split '{split}' (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an error message, so the UserError stays one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class HFDataset(ImageDataset):
    """One split of a Hugging Face dataset.

    The image column may be an `Image` feature, a string path (relative paths are taken
    from the current directory) or raw encoded bytes. Class names come from a `ClassLabel`
    label column; otherwise from the sorted unique label values: strings become the names,
    integers ``v`` become ``"class_v"``. Underscores in names from the data become spaces.
    """

    def __init__(self, table: datasets.Dataset, name: str, image_column: str, label_column: str):
        import datasets

        self.name = name
        for kind, column in (("image", image_column), ("label", label_column)):
            if column not in table.column_names:
                raise UserError(
                    f"{name} has no {kind} column '{column}' (columns: {', '.join(table.column_names)}); "
                    f"choose one with --{kind}-column"
                )
        self.classnames, self.labels = _classes(table, label_column, name)
        feature = table.features[image_column]
        images = table.select_columns([image_column])
        if isinstance(feature, datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in _PATH_OR_BYTES_DTYPES):
            raise UserError(f"{name}: image column '{image_column}' holds {feature}, not images, paths or bytes")
        self._images = images
        self._column = image_column
        self._path_column = isinstance(feature, datasets.Value) and "string" in feature.dtype

    def load(self, index: int) -> Image.Image:
        value = self._images[index][self._column]
        if isinstance(value, dict):  # an Image feature read with decode=False
            value = value.get("bytes") or value.get("path")
        locator = f"{self.name} {self.describe(index)}"
        if not value:
            raise CorruptImageError(f"{locator}: no image")
        return open_rgb(value, locator=locator)

    def describe(self, index: int) -> str:
        return f"row {index}"

    def identity(self, index: int) -> str:
        """The table's content fingerprint (`datasets` hashes the data it loads) and the row; for a
        column of file paths, the file's identity too (the table holds only the path)."""
        where = f"{getattr(self._images, '_fingerprint', self.name)}/row {index}"
        if not self._path_column:
            return where
        value = self._images[index][self._column]
        return f"{where}/{file_identity(Path(value))}" if isinstance(value, str) else where


def _classes(table: datasets.Dataset, column: str, name: str) -> tuple[list[str], list[int]]:
    """Class names and integer labels of `column` (see `HFDataset` for the naming rule)."""
    import datasets

    feature = table.features[column]
    values = list(table[column])
    if isinstance(feature, datasets.ClassLabel):
        if any(v is None or v < 0 for v in values):
            raise UserError(f"{name}: label column '{column}' has rows without a label")
        return [c.replace("_", " ") for c in feature.names], [int(v) for v in values]
    if all(isinstance(v, str) for v in values):
        unique = sorted(set(values))
        names = [v.replace("_", " ") for v in unique]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        unique = sorted(set(values))
        names = [f"class_{v}" for v in unique]
    else:
        raise UserError(f"{name}: label column '{column}' must hold a ClassLabel, strings or integers ({feature})")
    index = {v: i for i, v in enumerate(unique)}
    return names, [index[v] for v in values]


HUB_SOURCE = DatasetSource("hf:NAME", "a Hugging Face hub dataset (needs network or a local cache)",
                           lambda argument, options: load_hf(argument, options, from_disk=False))
DISK_SOURCE = DatasetSource("hf-disk:PATH", "a Hugging Face dataset saved with save_to_disk",
                            lambda argument, options: load_hf(argument, options, from_disk=True))
