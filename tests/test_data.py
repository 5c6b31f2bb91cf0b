"""Dataset sources on data generated here: image folders, CoOp layouts, saved HF datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptbench_vlm.data import CorruptImageError, DatasetOptions, load_dataset
from promptbench_vlm.errors import UserError


def _write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _make_class_folders(root: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        for i in range(count):
            _write_image(root / name / f"img{i}.{'png' if i % 2 else 'JPG'}")


# --- image folder -------------------------------------------------------------------------


def test_folder_flat_layout_serves_any_split(tmp_path):
    _make_class_folders(tmp_path, {"golden_retriever": 2, "cat": 1, "zebra": 3})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}", DatasetOptions(split="train"))
    assert ds.classnames == ["cat", "golden retriever", "zebra"]
    assert ds.labels == [0, 1, 1, 2, 2, 2]
    assert ds.name == f"folder:{tmp_path}"
    img = ds.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert ds.describe(0).endswith("img0.JPG")


def test_folder_split_layout_and_missing_split(tmp_path):
    _make_class_folders(tmp_path / "train", {"a": 1, "b": 1})
    _make_class_folders(tmp_path / "test", {"a": 2, "b": 1, "c": 1})
    ds = load_dataset(f"folder:{tmp_path}", DatasetOptions(split="test"))
    assert ds.classnames == ["a", "b", "c"] and len(ds) == 4
    with pytest.raises(UserError, match=r"no 'val' split folder \(present: train, test\)"):
        load_dataset(f"folder:{tmp_path}", DatasetOptions(split="val"))


def test_folder_class_named_train_is_not_a_split_layout(tmp_path):
    _make_class_folders(tmp_path, {"train": 1, "tractor": 1})
    assert load_dataset(f"folder:{tmp_path}").classnames == ["tractor", "train"]


def test_folder_base_new_subsets_relabel_from_zero(tmp_path):
    _make_class_folders(tmp_path, {c: 1 for c in "abcde"})
    base = load_dataset(f"folder:{tmp_path}", subset="base")
    new = load_dataset(f"folder:{tmp_path}", subset="new")
    assert base.classnames == ["a", "b", "c"] and base.labels == [0, 1, 2]
    assert new.classnames == ["d", "e"] and new.labels == [0, 1]
    assert new.load(1).mode == "RGB"


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    _make_class_folders(tmp_path, {"a": 1})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class' holds no images"):
        load_dataset(f"folder:{tmp_path}")


def test_corrupt_image_is_listed_and_raises_on_load(tmp_path):
    _make_class_folders(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = _write_image(tmp_path / "b" / "truncated.jpg")
    good.write_bytes(good.read_bytes()[:200])
    ds = load_dataset(f"folder:{tmp_path}")
    assert len(ds) == 3
    for i in (1, 2):
        with pytest.raises(CorruptImageError, match=r"\.(png|jpg): cannot decode image"):
            ds.load(i)


def test_unknown_source_suggests(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'folder'"):
        load_dataset(f"foldr:{tmp_path}")


# --- CoOp layout --------------------------------------------------------------------------


def _make_pets(root: Path) -> None:
    classes = ["abyssinian", "american_bulldog", "beagle"]
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for s, n in (("train", 2), ("val", 1), ("test", 1 + label)):
            for i in range(n):
                rel = f"{name}_{s}_{i}.jpg"
                _write_image(root / "oxford_pets" / "images" / rel)
                split[s].append([rel, label, name])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))


def test_coop_split_file_dataset(tmp_path):
    _make_pets(tmp_path)
    ds = load_dataset(f"coop:oxford_pets@{tmp_path}", DatasetOptions(split="test"))
    assert ds.classnames == ["abyssinian", "american bulldog", "beagle"]
    assert ds.labels == [0, 1, 1, 2, 2, 2]
    assert ds.load(0).mode == "RGB"
    assert ds.describe(0) == str(tmp_path / "oxford_pets" / "images" / "abyssinian_test_0.jpg")
    assert len(load_dataset(f"coop:oxford_pets@{tmp_path}", DatasetOptions(split="train"))) == 6
    new = load_dataset(f"coop:oxford_pets@{tmp_path}", subset="new")  # base = 2 of 3 classes
    assert new.classnames == ["beagle"] and new.labels == [0, 0, 0]


def test_coop_fgvc_aircraft(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    (folder / "variants.txt").write_text("707-320\nA300B4\nF-16A/B\n")
    (folder / "images_variant_test.txt").write_text("0001 F-16A/B\n0002 707-320\n0003 A300B4\n")
    for image_id in ("0001", "0002", "0003"):
        _write_image(folder / "images" / f"{image_id}.jpg")
    ds = load_dataset(f"coop:fgvc_aircraft@{tmp_path}", subset="base")
    assert ds.classnames == ["707-320", "A300B4"]
    assert ds.labels == [0, 1] and ds.describe(0).endswith("0002.jpg")
    with pytest.raises(UserError, match=r"missing split file: expected '.*images_variant_train\.txt'"):
        load_dataset(f"coop:fgvc_aircraft@{tmp_path}", DatasetOptions(split="train"))


def test_coop_imagenet(tmp_path):
    folder = tmp_path / "imagenet"
    folder.mkdir()
    (folder / "classnames.txt").write_text("n02 goldfish\nn01 tench\nn03 great white shark\n")
    for split in ("train", "val"):
        for wnid in ("n01", "n02", "n03"):
            _write_image(folder / "images" / split / wnid / f"{wnid}_{split}.JPEG")
    ds = load_dataset(f"coop:imagenet@{tmp_path}", DatasetOptions(split="test"))
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert ds.labels == [0, 1, 2] and "images/val/n01" in ds.describe(0).replace("\\", "/")
    assert load_dataset(f"coop:imagenet@{tmp_path}", DatasetOptions(split="train")).load(2).mode == "RGB"
    with pytest.raises(UserError, match="no separate 'val' split"):
        load_dataset(f"coop:imagenet@{tmp_path}", DatasetOptions(split="val"))


def test_coop_errors(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'oxford_pets'"):
        load_dataset(f"coop:oxford_pet@{tmp_path}")
    with pytest.raises(UserError, match=r"missing split file: expected '.*split_zhou_DescribableTextures\.json'"):
        load_dataset(f"coop:dtd@{tmp_path}")
    with pytest.raises(UserError, match="coop:NAME@ROOT"):
        load_dataset("coop:dtd")


# --- Hugging Face ---------------------------------------------------------------------------


def _save_hf(tmp_path: Path, as_dict: bool = True) -> Path:
    import datasets

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    table = datasets.Dataset.from_dict(
        {"img": [_png_bytes(c) for c in colors[:3]] + [b"not an image"], "y": [2, 0, 1, 0]},
        features=datasets.Features(
            {"img": datasets.Image(), "y": datasets.ClassLabel(names=["red_fox", "cat", "dog"])}
        ),
    )
    path = tmp_path / "saved"
    (datasets.DatasetDict({"test": table, "train": table}) if as_dict else table).save_to_disk(str(path))
    return path


def test_hf_disk_dataset_and_corrupt_row(tmp_path):
    path = _save_hf(tmp_path)
    opts = DatasetOptions(split="test", image_column="img", label_column="y")
    ds = load_dataset(f"hf-disk:{path}", opts)
    assert ds.classnames == ["red fox", "cat", "dog"] and ds.labels == [2, 0, 1, 0]
    assert ds.load(1).getpixel((0, 0)) == (0, 255, 0)
    assert ds.describe(3) == "row 3"
    with pytest.raises(CorruptImageError, match="row 3: cannot decode image"):
        ds.load(3)
    base = load_dataset(f"hf-disk:{path}", opts, subset="base")
    assert base.classnames == ["red fox", "cat"] and base.labels == [0, 1, 0]


def test_hf_plain_labels_and_path_column(tmp_path):
    import datasets

    files = [str(_write_image(tmp_path / f"{i}.png")) for i in range(3)]
    path = tmp_path / "plain"
    datasets.Dataset.from_dict({"image": files, "label": [7, 3, 7]}).save_to_disk(str(path))
    ds = load_dataset(f"hf-disk:{path}")
    assert ds.classnames == ["class_3", "class_7"] and ds.labels == [1, 0, 1]
    assert ds.load(2).mode == "RGB"


def test_hf_errors(tmp_path):
    path = _save_hf(tmp_path)
    with pytest.raises(UserError, match=r"no image column 'image' \(columns: img, y\)"):
        load_dataset(f"hf-disk:{path}", DatasetOptions(label_column="y"))
    with pytest.raises(UserError, match=r"no split 'val' \(splits: test, train\)"):
        load_dataset(f"hf-disk:{path}", DatasetOptions(split="val", image_column="img", label_column="y"))
    with pytest.raises(UserError, match="cannot load saved Hugging Face dataset"):
        load_dataset(f"hf-disk:{tmp_path / 'missing'}")


def test_hf_hub_offline_is_one_line_user_error(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError) as info:
        load_dataset("hf:no-such-org/no-such-dataset")
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-org/no-such-dataset" in message and "hf-disk:PATH" in message


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey at 255: a mid-grey image came out white."""
    from promptbench_vlm.data.images import open_rgb

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = np.asarray(open_rgb(tmp_path / "deep.png"), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    assert abs(pixels.mean() - (ramp / 257).mean()) < 0.5 and pixels.min() == 0 and pixels.max() == 255


def test_flat_folder_says_it_serves_every_split(image_folder, tmp_path):
    from promptbench_vlm.data import DatasetOptions, load_dataset

    assert load_dataset(f"folder:{image_folder}", DatasetOptions(split="train"), "base").split_ignored
    split = tmp_path / "split"
    (split / "train").mkdir(parents=True)
    image_folder.rename(split / "test")
    assert not load_dataset(f"folder:{split}", DatasetOptions(split="test"), "base").split_ignored
