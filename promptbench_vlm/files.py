"""File-system helpers shared by every writer: atomic replacement, the user cache folder, run
folders this package owns, claims on them, and reading users' text files.

Every file this package writes (result JSON and CSV, checkpoints, run settings, cache entries)
goes through `atomic_path`, so a crash or a kill never leaves half a file where a reader looks.
Nothing here deletes or replaces a file this package did not write: a run folder is ours when it
holds the `RUN_MARKER` (or, from earlier versions, a ``train.json`` / ``result.json``), and even
then only the files named by its writer are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputWarning, UserError

RUN_MARKER = ".promptbench-run"
"""Written into every run folder this package creates: the proof that `--overwrite` may clear it."""
LOCK = ".promptbench-lock"
"""The claim on a run folder (an fcntl lock on this file, holding the writer's pid)."""


class FolderBusy(UserError):
    """A run folder is claimed by another process (see `claim_folder`)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it.

    The temporary file lives in the same folder, so the final rename is atomic on POSIX.

    Raises:
        UserError: the folder cannot be created or written, or `path` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers, e.g. safetensors) make it 0600: give it the mode open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
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


def check_output_file(path: str | Path, overwrite: bool, ours: bool | None = None, flag: str = "--output") -> Path:
    """Refuse, before any work, an output file that cannot or must not be written.

    Args:
        path: The file to be written.
        overwrite: The user passed ``--overwrite``.
        ours: Whether an existing file at `path` was written by this package (None: not known).

    Raises:
        UserError: `path` is a folder, its folder cannot be written, or it exists and `overwrite`
            is off (or the file is not one this package wrote).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file path")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another path")
        if ours is False:
            raise UserError(f"{flag} {path} exists and was not written by promptbench_vlm; it is left alone, "
                            "choose another path")
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise UserError(f"cannot write {flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {path}: {folder} is not writable")
    return path


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def is_run_folder(folder: Path, legacy: Iterable[str] = ()) -> bool:
    """True when `folder` was created by this package: it holds the marker or one of `legacy`
    (the settings or result files earlier versions wrote before the marker existed)."""
    return (folder / RUN_MARKER).is_file() or any((folder / name).is_file() for name in legacy)


def refuse_unsafe_folder(folder: Path) -> None:
    """Refuse a run folder that is the working directory, one of its parents, or the home folder."""
    target = folder.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path.home().resolve():
        raise UserError(f"{folder} is the working directory, the home folder or a parent of them; "
                        "a run needs a folder of its own: choose another --output")


def foreign_entries(folder: Path, ours: Iterable[str]) -> list[str]:
    """Names in `folder` that are not among `ours` (nor our marker, lock or temporary files)."""
    known = {*ours, RUN_MARKER, LOCK}
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in known and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def check_run_folder(folder: Path, ours: Iterable[str], replace: bool, legacy: Iterable[str] = ()) -> None:
    """Refuse a run folder this package must not write into; change nothing.

    Args:
        folder: The run folder.
        ours: The names of the files the run writes (the only ones `remove_run_files` removes).
        replace: ``--overwrite`` was asked: allowed only on a folder of ours that holds nothing else.
        legacy: Files that prove a folder without the marker ours (see `is_run_folder`).

    Raises:
        UserError: the folder is the working directory or a parent of it, a file, not empty and
            not written by this package, or (with `replace`) also holds files we did not write.
    """
    ours = tuple(ours)
    refuse_unsafe_folder(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file; a run writes a folder: choose another --output")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    foreign = foreign_entries(folder, ours)
    listed = f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
    if not is_run_folder(folder, legacy):
        raise UserError(f"{folder} is not empty and was not written by promptbench_vlm (it holds {listed}); "
                        "it is left alone: choose another --output")
    if replace and foreign:
        raise UserError(f"--overwrite: {folder} also holds files promptbench_vlm did not write ({listed}); "
                        "they are left alone: move them or choose another --output")


def remove_run_files(folder: Path, names: Iterable[str]) -> None:
    """Remove the files `names` of a run folder (those present); nothing else is touched."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


def mark_run_folder(folder: Path) -> None:
    """Create `folder` (if needed) with the `RUN_MARKER` that makes it ours.

    Raises:
        UserError: the folder cannot be created.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_MARKER).touch()
    except OSError as err:
        raise UserError(f"cannot create the run folder {folder}: {err.strerror or err}") from None


_CLAIMS: dict[Path, int] = {}
"""Run folders this process has claimed: resolved path -> the open, locked lock file."""


def claim_folder(folder: Path, wait: bool) -> None:
    """Claim `folder` for this process until `release_folder`: create it, mark it as ours, and take
    an exclusive fcntl lock on its `LOCK` file (which holds our pid).

    Two writers of one run folder never run at once: the second waits (`wait`) or is refused. The
    lock dies with its process, so a killed run never leaves a stale claim. Claiming a folder
    this process already holds does nothing.

    Raises:
        FolderBusy: the folder is claimed by another process and `wait` is off.
        UserError: the folder cannot be made.
    """
    import fcntl

    key = folder.resolve()
    if key in _CLAIMS:
        return
    mark_run_folder(folder)
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot create the run folder {folder}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise FolderBusy(f"{folder} is being written by another process (pid {holder}); "
                        "wait for it to finish, or choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _CLAIMS[key] = fd


def release_folder(folder: Path) -> None:
    """Give up this process's claim on `folder` (if it holds one)."""
    fd = _CLAIMS.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def reading_folder(folder: Path) -> Iterator[None]:
    """Read `folder` while no other process writes it: wait for its claim to be released and hold a
    shared lock meanwhile. A folder without a lock file (or one this process claims) is read as is."""
    import fcntl

    if folder.resolve() in _CLAIMS or not (folder / LOCK).is_file():
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def read_user_text(path: str | Path, what: str) -> str:
    """Read a user's text file: UTF-8 (a byte-order mark is dropped), else Latin-1 with a warning.

    Latin-1 decodes any bytes, so the fallback never fails; the warning names the first byte that
    is not UTF-8, so a wrongly decoded file is easy to spot.

    Raises:
        UserError: the file is missing, a folder, or unreadable.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        warnings.warn(f"{what} {path} is not UTF-8 (byte 0x{data[err.start]:02x} on line {line}); "
                      "read as Latin-1: save it as UTF-8 to be sure of its text", InputWarning, stacklevel=2)
        return data.decode("latin-1")
