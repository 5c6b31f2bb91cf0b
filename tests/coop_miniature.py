"""Miniature CoOp/Dassl data roots: every dataset's real folder layout with a handful of tiny images.

Written from CoOp's ``DATASETS.md`` and ``datasets/*.py`` independently of `promptbench_vlm.data.coop`,
so a test that loads them checks the loader's facts, not a copy of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SPLIT_FILE_LAYOUTS = {  # name: (image folder under ROOT, split file under ROOT)
    "caltech101": ("caltech-101/101_ObjectCategories", "caltech-101/split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets/images", "oxford_pets/split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "stanford_cars/split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers/jpg", "oxford_flowers/split_zhou_OxfordFlowers.json"),
    "food101": ("food-101/images", "food-101/split_zhou_Food101.json"),
    "sun397": ("sun397/SUN397", "sun397/split_zhou_SUN397.json"),
    "dtd": ("dtd/images", "dtd/split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat/2750", "eurosat/split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101/UCF-101-midframes", "ucf101/split_zhou_UCF101.json"),
}
CROSS_DATASET_TARGETS = (*SPLIT_FILE_LAYOUTS, "fgvc_aircraft")
"""The papers' 10 cross-dataset targets (ImageNet is the source)."""
IMAGENET = {  # ImageNet's first six classes, wnid -> CLIP's class name (classnames.txt is sorted by wnid)
    "n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
    "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray",
}
SUBSET_200 = ("n01443537", "n01491361", "n01494475")
"""The miniature's stand-in for the 200 classes of ImageNet-A and -R."""
CLASSES = ["class_a", "class_b", "class_c"]
TEST_IMAGES = (1, 2, 1)  # per class: labels [0, 1, 1, 2]


def image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (40 * shade % 256, 90, 160)).save(path, format="JPEG")


def _split_file_dataset(root: Path, name: str) -> None:
    image_dir, split_file = SPLIT_FILE_LAYOUTS[name]
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(CLASSES):
        for part, n in (("train", 1), ("val", 1), ("test", TEST_IMAGES[label])):
            for i in range(n):
                rel = f"{classname}/{part}_{i}.jpg"
                image(root / image_dir / rel, label)
                split[part].append([rel, label, classname])
    (root / split_file).write_text(json.dumps(split))


def _aircraft(root: Path) -> None:
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("\n".join(CLASSES) + "\n")
    lines, n = [], 0
    for label, classname in enumerate(CLASSES):
        for _ in range(TEST_IMAGES[label]):
            n += 1
            image(folder / "images" / f"{n:07d}.jpg", label)
            lines.append(f"{n:07d} {classname}")
    (folder / "images_variant_test.txt").write_text("\n".join(lines) + "\n")


def _classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in IMAGENET.items()))


def _imagenet_family(root: Path) -> None:
    _classnames(root / "imagenet")
    for part in ("train", "val"):
        for wnid in IMAGENET:
            image(root / "imagenet" / "images" / part / wnid / f"{wnid}_{part}.JPEG")
    _classnames(root / "imagenetv2")
    for number in range(len(IMAGENET)):  # folder k holds classnames.txt's k-th class
        image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(number) / "a.jpeg", number)
    _classnames(root / "imagenet-sketch")
    for wnid in IMAGENET:
        image(root / "imagenet-sketch" / "images" / wnid / "sketch_0.JPEG")
    for folder, image_dir in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        _classnames(root / folder)
        for k, wnid in enumerate(SUBSET_200):
            for i in range(k + 1):
                image(root / folder / image_dir / wnid / f"{i}.jpg", k)
        (root / folder / image_dir / "README.txt").write_text("the dataset's own read-me, not a class\n")


def build_coop_root(root: Path) -> Path:
    """Write every dataset of the three protocols under `root` and return it."""
    for name in SPLIT_FILE_LAYOUTS:
        _split_file_dataset(root, name)
    _aircraft(root)
    _imagenet_family(root)
    return root
