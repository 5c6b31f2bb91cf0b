"""Interrupting and resuming an evaluation.

An evaluation advances in units that are kept on disk as soon as they are done: each finished
subset in the result file (marked ``"complete": false`` until the last one), and, with the
feature cache on, each chunk of image features and each segment of prompt-string features.
SIGTERM is turned into an interrupt like Ctrl-C, so a killed run still writes what it finished;
``--resume`` then reads the earlier result file back, checks it describes the same evaluation,
and evaluates only the subsets it lacks.
"""

from __future__ import annotations

import contextlib
import glob
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .results import read_result

VOLATILE_RUN_FIELDS = ("command", "started", "wall_time_s")
"""Run fields that differ between an interrupted run and its resumption by nature."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled as an interrupt, so finished work is written before exiting."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (outside the main thread: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _comparable(run: dict[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(run, default=str))
    return {k: v for k, v in plain.items() if k not in VOLATILE_RUN_FIELDS}


def find_previous(pattern: str, run: dict[str, Any]) -> Path | None:
    """The newest result file matching the glob `pattern` written by the same evaluation as `run`.

    Raises:
        UserError: a file matches by name but describes another evaluation (names the field).
    """
    candidates = sorted((Path(p) for p in glob.glob(pattern)), key=lambda p: p.stat().st_mtime, reverse=True)
    wanted = _comparable(run)
    mismatch = None
    for path in candidates:
        earlier = _comparable(read_result(path)["run"])
        differing = sorted(k for k in wanted.keys() | earlier.keys() if wanted.get(k) != earlier.get(k))
        if not differing:
            return path
        mismatch = mismatch or (path, differing)
    if mismatch:
        path, fields = mismatch
        raise UserError(f"--resume: {path} is the result of another evaluation ({', '.join(fields[:3])} differ); "
                        f"pass the same options, or another --output")
    return None


def finished_subsets(path: Path | None) -> tuple[dict[str, dict[str, Any]], bool]:
    """The subsets already in the result file at `path` (JSON form) and whether it is complete."""
    if path is None:
        return {}, False
    doc = read_result(path)
    return dict(doc["subsets"]), bool(doc["complete"])
