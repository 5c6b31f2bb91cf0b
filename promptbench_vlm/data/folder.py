"""An image folder: one sub-folder per class, optionally under train/ val/ test/ split folders.

Two layouts are accepted, told apart by the root's sub-folders:

- split layout: every sub-folder of the root is named ``train``, ``val`` or ``test``; the
  requested split's folder is the class root, and a missing one is an error.
- flat layout: anything else; the root itself is the class root, and it serves every split
  (``--split`` is then ignored, so train and test are the same images).

Requiring *every* sub-folder to be a split name keeps a class that happens to be called
"train" (CIFAR-100 has one) from turning a flat folder into a split layout.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import DatasetOptions, DatasetSource
from .base import ImageDataset
from .images import FileDataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_FOLDERS = ("train", "val", "test")


class FolderDataset(FileDataset):
    """Images in ``root/[split/]<class>/…``; class names are folder names with '_' -> ' '.

    Labels follow the sorted class folder names. Images are found recursively inside each
    class folder by extension (case-insensitive); other files and hidden entries are ignored.
    Files are listed here; they are decoded only in `load`.
    """

    def __init__(self, root: str | Path, split: str = "test"):
        self.name = f"folder:{root}"
        class_root = _class_root(Path(root).expanduser(), split)
        self.split_ignored = class_root == Path(root).expanduser()
        class_dirs = sorted(_visible_dirs(class_root), key=lambda d: d.name)
        if not class_dirs:
            raise UserError(f"image folder '{class_root}' has no class sub-folders")
        self.classnames = [d.name.replace("_", " ") for d in class_dirs]
        self.paths: list[Path] = []
        self.labels = []
        for label, class_dir in enumerate(class_dirs):
            images = _image_files(class_dir)
            if not images:
                raise UserError(
                    f"class folder '{class_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            self.paths += images
            self.labels += [label] * len(images)


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of `folder`, skipping hidden ones (.git, .ipynb_checkpoints)."""
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _class_root(root: Path, split: str) -> Path:
    """The folder whose sub-folders are the classes for `split` (see the module docstring)."""
    if not root.is_dir():
        raise UserError(f"image folder '{root}' does not exist or is not a folder")
    subdirs = {d.name for d in _visible_dirs(root)}
    if not subdirs or not subdirs <= set(SPLIT_FOLDERS):
        return root
    if split not in subdirs:
        present = ", ".join(s for s in SPLIT_FOLDERS if s in subdirs)
        raise UserError(f"image folder '{root}' has no '{split}' split folder (present: {present})")
    return root / split


def _image_files(class_dir: Path) -> list[Path]:
    """Image files anywhere under `class_dir`, in sorted path order, hidden entries skipped."""
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )


def _load_source(argument: str, options: DatasetOptions) -> ImageDataset:
    return FolderDataset(argument, split=options.split)


SOURCE = DatasetSource("folder:PATH", "an image folder, one sub-folder per class", _load_source)
