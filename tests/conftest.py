"""Shared fixtures: a tiny random open_clip model and small generated image data (all offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptbench_vlm import cli
from promptbench_vlm.backbone import Backbone, load_backbone
from promptbench_vlm.data.base import CorruptImageError, ImageDataset

TINY_CONFIG = Path(__file__).parent / "data" / "tiny-clip.json"
# class names as the CoOp datasets spell them (Pets, Cars, Aircraft, Flowers, Food, DTD, EuroSAT,
# UCF101 with underscores replaced, SUN397, Caltech101); the tokenizer and perturbation tests share them
COOP_NAMES = ["Abyssinian", "american pit bull terrier", "2012 Mercedes-Benz S-Class Sedan", "Boeing 737-200",
              "Cessna 172", "F/A-18", "pink primrose", "bird of paradise", "apple pie", "eggs benedict", "bubbly",
              "Herbaceous Vegetation Land", "Annual Crop Land", "Apply Eye Makeup", "Yo Yo", "abbey",
              "indoor apse", "Leopards", "Faces", "yin yang", "Geoffroy's spider monkey", "potter's wheel"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def colour_image(rgb: tuple[int, int, int], seed: int, size: int = 32) -> Image.Image:
    """A flat colour with a little seeded noise: distinct per class, varied per image."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_colour_folder(root: Path, per_class: int, class_stride: int, offset: int = 0) -> Path:
    """An image folder at `root`, one sub-folder per colour class; image i of class c has seed
    ``class_stride * c + i + offset`` (a distinct offset gives another split distinct images)."""
    for c, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour_image(rgb, seed=class_stride * c + i + offset).save(root / name / f"{i}.png")
    return root


def write_train_test_folders(root: Path, train: int, test: int) -> Path:
    """`root/train` and `root/test` colour folders with distinct images: a training run's data."""
    write_colour_folder(root / "train", per_class=train, class_stride=100)
    write_colour_folder(root / "test", per_class=test, class_stride=100, offset=50)
    return root


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run `promptbench ARGS` in-process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["promptbench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def console_script() -> str:
    """The installed `promptbench` console script of this interpreter's environment (as users get it)."""
    beside = Path(sys.executable).parent / "promptbench"
    found = str(beside) if beside.exists() else shutil.which("promptbench")
    if not found:
        raise RuntimeError("the promptbench console script is not installed: pip install -e .")
    return found


def run_console(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `promptbench ARGS` in a subprocess; stdout and stderr captured as text.

    The test's `PROMPTBENCH_CACHE` (see `private_cache`) is inherited through the environment.
    """
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """A clear usage/input error: exit `code`, no traceback, one non-empty stderr line holding `needles`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def assert_equal_up_to_float_order(got, expected, tol: float = 1e-7, where: str = "") -> None:
    """`got` equals `expected` (nested JSON values): keys, lengths, integers, strings and flags
    exactly, floats within `tol`. torch promises no bit-equal floats across batch sizes or thread
    counts (2.14 moved per-image JSDs by 3e-8 between a batch of 2 images and one of 6), so a run
    that encodes in other batches than its reference is held to its counts exactly and its floats
    to the rounding of their last digits."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), where
        for key in expected:
            assert_equal_up_to_float_order(got[key], expected[key], tol, f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_equal_up_to_float_order(g, e, tol, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert got == pytest.approx(expected, abs=tol, nan_ok=True), where
    else:
        assert type(got) is type(expected) and got == expected, where


def schema_property_names(schema) -> set[str]:
    """Every property name a JSON Schema declares, at any depth (for the docs-describe-every-field tests)."""
    names: set[str] = set()
    if isinstance(schema, dict):
        names |= set(schema.get("properties", {}))
        for value in schema.values():
            names |= schema_property_names(value)
    elif isinstance(schema, list):
        for value in schema:
            names |= schema_property_names(value)
    return names


class ColourDataset(ImageDataset):
    """In-memory dataset of colour classes; `corrupt` indices raise CorruptImageError."""

    def __init__(self, per_class: int = 3, corrupt: tuple[int, ...] = ()):
        self.name = "colours"
        self.classnames = list(COLOURS)
        self.labels = [c for c in range(len(COLOURS)) for _ in range(per_class)]
        self.corrupt = set(corrupt)

    def load(self, index: int) -> Image.Image:
        if index in self.corrupt:
            raise CorruptImageError(f"colours/{index}: cannot identify image file")
        return colour_image(COLOURS[self.classnames[self.labels[index]]], seed=index)

    def describe(self, index: int) -> str:
        return f"colours/{index}"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty user cache (feature cache), never the real one."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PROMPTBENCH_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(str(TINY_CONFIG), device="cpu")


@pytest.fixture
def colour_dataset() -> ColourDataset:
    return ColourDataset()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An image folder with one sub-folder per colour class, 3 PNGs each."""
    return write_colour_folder(tmp_path / "colours", per_class=3, class_stride=10)
