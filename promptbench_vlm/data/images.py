"""Decoding one image file or blob into RGB, the only place the sources touch PIL.

Decoding is forced here (not left lazy to PIL) so that a truncated or corrupt file fails
inside `load` as a `CorruptImageError` the evaluator can skip and count, never later inside
preprocessing or a DataLoader worker.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .base import CorruptImageError, ImageDataset, file_identity

# Every failure PIL is known to raise for a bad file: unreadable or unidentified files
# (OSError), truncated data (OSError), malformed chunks (SyntaxError, ValueError,
# EOFError) and absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
"""Single-channel modes wider than 8 bits: PIL's ``convert("RGB")`` clips them at 255 (a 16-bit
PNG turns almost white), so they are scaled here instead."""


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer / float) grey image to 8 bits, then to RGB.

    16-bit modes are divided by 257 (65535 -> 255). PIL reads 16-bit files as mode ``I`` too, so
    an ``I`` image is taken as 16-bit when a value exceeds 255 and as 8-bit otherwise; a float
    image in [0, 1] is scaled by 255, one beyond it is clipped at 255.
    """
    pixels = np.asarray(img, dtype=np.float64)
    top = float(pixels.max()) if pixels.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
        pixels = pixels / 257.0
    elif img.mode == "F" and top <= 1.0:
        pixels = pixels * 255.0
    grey = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def open_rgb(source: str | Path | bytes, locator: str | None = None) -> Image.Image:
    """Fully decode `source` (a file path or the encoded bytes) into an RGB image.

    Args:
        source: A path to an image file, or the bytes of an encoded image.
        locator: What to call the image in the error (defaults to the path, or "image bytes").

    Raises:
        CorruptImageError: if the image cannot be read or decoded, naming `locator`.
    """
    where = locator or (str(source) if isinstance(source, (str, Path)) else "image bytes")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
            if img.mode in _WIDE_MODES:
                return _wide_to_rgb(img)
            return img.convert("RGB")
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from err


class FileDataset(ImageDataset):
    """A dataset whose images are files (`paths`, one per image): decoded in `load`, located by
    path, and told apart by path, size and modification time (`file_identity`)."""

    paths: list[Path]

    def load(self, index: int) -> Image.Image:
        return open_rgb(self.paths[index])

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def identity(self, index: int) -> str:
        return file_identity(self.paths[index])
