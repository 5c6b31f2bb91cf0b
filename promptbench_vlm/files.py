"""File-system helpers shared by every writer: atomic replacement and the user cache folder.

Every file this package writes (result JSON and CSV, checkpoints, run settings, cache entries)
goes through `atomic_path`, so a crash or a kill never leaves half a file where a reader looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it.

    The temporary file lives in the same folder, so the final rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers, e.g. safetensors) make it 0600: give it the mode open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """The user cache folder: ``$PROMPTBENCH_CACHE``, else ``$XDG_CACHE_HOME/promptbench_vlm``,
    else ``~/.cache/promptbench_vlm``. Read at call time so tests and users can redirect it."""
    if os.environ.get("PROMPTBENCH_CACHE"):
        return Path(os.environ["PROMPTBENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "promptbench_vlm"


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
