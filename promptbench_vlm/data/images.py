"""Decoding one image file or blob into RGB, the only place the sources touch PIL.

Decoding is forced here (not left lazy to PIL) so that a truncated or corrupt file fails
inside `load` as a `CorruptImageError` the evaluator can skip and count, never later inside
preprocessing or a DataLoader worker.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from .base import CorruptImageError

# Every failure PIL is known to raise for a bad file: unreadable or unidentified files
# (OSError), truncated data (OSError), malformed chunks (SyntaxError, ValueError,
# EOFError) and absurd sizes (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


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
            return img.convert("RGB")
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from err
