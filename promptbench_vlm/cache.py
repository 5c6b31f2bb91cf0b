"""On-disk feature cache: image features per chunk of images, text features per prompt string.

Image features never depend on the template, so a re-run with other templates or perturbations
needs none of them recomputed; text features of one text encoder never depend on the dataset.
Entries are safetensors files (never a pickle) written atomically, each carrying the full key it
was computed under and a SHA-256 of every tensor as JSON metadata:

- images: ``images/<key digest>/<start>-<end>.safetensors`` holds the features and item indices
  of the readable images in ``[start, end)`` and the skipped ones. The key: backbone weights hash,
  the encoding code (see `_encoder`), the learned state (only for learners whose image side is
  learned), the preprocessing, the dataset fingerprint (resolved paths, sizes and modification
  times of the files), the split and the numeric precision.
- texts: ``texts/<key digest>/<segment digest>.safetensors`` holds features of a list of prompt
  strings. The key: backbone weights hash, the encoding code, learner, options and learned
  state, and precision.
- prompts: ``prompts/<key digest>.safetensors`` holds a prompt table (`prompts.PromptTable`),
  whose pure-Python build costs more than loading it. The key: templates, class names,
  perturbation specs, draws, seed, lexicon content and the code hash of the perturbation ops.

A chunk of images and a segment of texts are also the units a killed run resumes from: they are
written as soon as they are computed. An entry that cannot be read, whose tensors do not match
their checksums, or whose stored key or shapes disagree with what is expected, is stale or
corrupt: it is reported (a `CacheWarning`) and rebuilt.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import InputWarning
from .files import atomic_path

FORMAT = "promptbench_vlm.features/2"
CHUNK_IMAGES = 256
"""Images per cache chunk: the unit of caching, resuming and sharding across ranks."""
SEGMENT_TEXTS = 2048
"""Prompt strings per text segment: the unit a killed run's text encoding resumes from."""


class CacheWarning(InputWarning):
    """A cache entry was stale or corrupt and is being rebuilt."""


def digest(value: Any) -> str:
    """A short SHA-256 of a JSON-serialisable value (sorted keys): stable across runs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a stored tensor's bytes: safetensors itself checks only the header."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over named tensors, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _encoder(learner: Any, method: str) -> dict[str, str]:
    """The code that computes the features: the class defining `method`, and a hash of that code.

    The hash covers the package version and the source files of the modules defining the
    learner's class and each of its base classes (outside torch), so an edited plug-in (installed
    editable) or an upgraded package never gets features its old code computed. A learner may
    instead declare ``cache_version`` (a string it changes with its encoding code).
    """
    cls = type(learner)
    func = getattr(cls, method)
    declared = getattr(cls, "cache_version", None)
    return {"method": f"{func.__module__}.{func.__qualname__}", "package": __version__,
            "code": f"declared:{declared}" if declared is not None else code_hash(cls)}


def code_hash(cls: type) -> str:
    """SHA-256 (16 hex digits) of the source files of the modules defining `cls` and its bases.

    Whole module files, not just the classes, so module-level helpers count too; torch's and
    the builtins' classes are skipped (their version is not in question). A class without a
    source file (built in C, made at run time) counts by its qualified name.
    """
    h = hashlib.sha256()
    seen: set[str] = set()
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if klass.__module__.split(".")[0] in ("torch", "builtins") or module is None or klass.__module__ in seen:
            continue
        seen.add(klass.__module__)
        h.update(klass.__module__.encode())
        try:
            h.update(Path(inspect.getfile(module)).read_bytes())
        except (TypeError, OSError):
            h.update(klass.__qualname__.encode())
    return h.hexdigest()[:16]


def image_key(learner: Any, dataset: Any, split: str, precision: str) -> dict[str, Any]:
    """Everything image features depend on. The learned state enters only when the learner
    declares a learned image side, so trained learners of one kind share their image features."""
    learned = bool(getattr(learner, "image_side_learned", False))
    mode = getattr(learner, "feature_mode", None)  # the inference path a learner chose for the subset (MMRL)
    return {
        **({"feature_mode": mode} if mode is not None else {}),
        "backbone": learner.backbone.weights_hash(),
        "encoder": _encoder(learner, "encode_images"),
        "learner_state": tensors_hash(learner.learned_state()) if learned else None,
        "learner_options": learner.options if learned else None,
        "preprocess": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(learner.backbone.preprocess)),  # no addresses
        "dataset": dataset.fingerprint(),
        "split": split,
        "precision": precision,
    }


def text_key(learner: Any, precision: str) -> dict[str, Any]:
    """Everything features of a prompt string depend on (the string itself aside)."""
    return {
        "backbone": learner.backbone.weights_hash(),
        "encoder": _encoder(learner, "encode_texts"),
        "learner": learner.name,
        "learner_options": learner.options,
        "learner_state": tensors_hash(learner.learned_state()),
        "precision": precision,
    }


class FeatureCache:
    """Image and text features on disk under `root`.

    Args:
        root: The cache folder (created on first write).
        warn: Called with a one-line message when an entry is stale or corrupt; by default a
            `CacheWarning` is issued.
    """

    def __init__(self, root: str | Path, warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.warn = warn or (lambda message: warnings.warn(message, CacheWarning, stacklevel=3))

    # --- images ---------------------------------------------------------------------------
    def _chunk_path(self, key: dict[str, Any], start: int, end: int) -> Path:
        return self.root / "images" / digest(key) / f"{start:09d}-{end:09d}.safetensors"

    def load_images(self, key: dict[str, Any], start: int, end: int
                    ) -> tuple[torch.Tensor, list[int], list[dict[str, str]]] | None:
        """Features ``[n, D]``, item indices and skipped records of images ``[start, end)``;
        None when absent, stale or corrupt (the latter two with a warning)."""
        path = self._chunk_path(key, start, end)
        if not path.is_file():
            return None
        entry = self._read(path, key)
        if entry is None:
            return None
        tensors, meta = entry
        indices = tensors["indices"].tolist()
        feats = tensors["features"]
        skipped = meta.get("skipped")
        if (meta.get("range") != [start, end] or not isinstance(skipped, list) or feats.shape[0] != len(indices)
                or len(indices) + len(skipped) != end - start or any(not start <= i < end for i in indices)):
            self.warn(f"feature cache entry {path} is stale (its contents do not match its key); rebuilding it")
            return None
        return feats, indices, skipped

    def store_images(self, key: dict[str, Any], start: int, end: int, features: torch.Tensor,
                     indices: Sequence[int], skipped: list[dict[str, str]]) -> None:
        """Write the chunk ``[start, end)`` atomically."""
        tensors = {"features": features.detach().to("cpu", torch.float32).contiguous(),
                   "indices": torch.as_tensor(list(indices), dtype=torch.int64)}
        self._write(self._chunk_path(key, start, end), tensors, key, {"range": [start, end], "skipped": skipped})

    # --- texts ----------------------------------------------------------------------------
    def _text_dir(self, key: dict[str, Any]) -> Path:
        return self.root / "texts" / digest(key)

    def load_texts(self, key: dict[str, Any], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached features ``[D]`` of those strings of `wanted` found in the cache."""
        want = set(wanted)
        found: dict[str, torch.Tensor] = {}
        folder = self._text_dir(key)
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            entry = self._read(path, key)
            if entry is None:
                continue
            tensors, meta = entry
            texts = meta.get("texts")
            feats = tensors["features"]
            if not isinstance(texts, list) or feats.shape[0] != len(texts):
                self.warn(f"feature cache entry {path} is stale (its contents do not match its key); rebuilding it")
                continue
            for row, text in enumerate(texts):
                if text in want:
                    found[text] = feats[row]
        return found

    def store_texts(self, key: dict[str, Any], texts: Sequence[str], features: torch.Tensor) -> None:
        """Write one segment of prompt strings and their features atomically."""
        path = self._text_dir(key) / f"{digest(list(texts))}.safetensors"
        tensors = {"features": features.detach().to("cpu", torch.float32).contiguous()}
        self._write(path, tensors, key, {"texts": list(texts)})

    # --- prompt tables --------------------------------------------------------------------
    def _table_path(self, key: dict[str, Any]) -> Path:
        return self.root / "prompts" / f"{digest(key)}.safetensors"

    def load_table(self, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The tensors of the prompt table stored under `key` (see `prompts.PromptTable`); None when
        absent, stale or corrupt (the latter two with a warning)."""
        path = self._table_path(key)
        entry = self._read(path, key) if path.is_file() else None
        return None if entry is None else entry[0]

    def store_table(self, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write a prompt table's tensors atomically."""
        self._write(self._table_path(key), tensors, key, {})

    # --- files ----------------------------------------------------------------------------
    def _write(self, path: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any], extra: dict[str, Any]) -> None:
        meta = {"format": FORMAT, "key": key, "checksums": {n: _checksum(t) for n, t in tensors.items()}, **extra}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"promptbench_vlm": json.dumps(meta, sort_keys=True)})

    def _read(self, path: Path, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Tensors and metadata of an entry written under `key`; None (with a warning) if the
        file is unreadable or was written under another key."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["promptbench_vlm"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            self.warn(f"feature cache entry {path} is corrupt ({reason}); rebuilding it")
            return None
        if meta.get("format") != FORMAT or meta.get("key") != json.loads(json.dumps(key)):
            self.warn(f"feature cache entry {path} is stale (written under another key); rebuilding it")
            return None
        sums = meta.get("checksums")
        if not isinstance(sums, dict) or sums != {n: _checksum(t) for n, t in tensors.items()}:
            self.warn(f"feature cache entry {path} is corrupt (its tensors do not match their checksums); rebuilding it")
            return None
        return tensors, meta


class MemoryCache:
    """Image and text features (and prompt tables) in memory, under the same keys as
    `FeatureCache`, for the life of one process; it serves wherever a `FeatureCache` does.

    An entry is reused exactly where the on-disk cache would reuse it (the zero-shot learner's
    prompts across seeds; the images of learners whose image side is not learned across every
    cell of a sweep), but nothing is written: a sweep's attacks would otherwise leave B x C
    prompt features of every trained learner on disk, of no use once its cell is attacked. Only
    the latest `image_keys` image keys (and prompt tables) and `text_keys` text keys (learner
    states) are kept, so memory stays bounded over a long sweep.
    """

    def __init__(self, image_keys: int = 8, text_keys: int = 2, warn: Callable[[str], None] | None = None):
        self.limits = {"images": image_keys, "texts": text_keys, "tables": image_keys}
        self.warn = warn or (lambda message: warnings.warn(message, CacheWarning, stacklevel=3))
        self._stores: dict[str, OrderedDict[str, dict]] = {kind: OrderedDict() for kind in self.limits}

    def _entries(self, kind: str, key: dict[str, Any], create: bool) -> dict | None:
        """The entries of `key` (now the most recently used), made when `create`; the oldest key
        beyond the limit goes."""
        store = self._stores[kind]
        name = digest(key)
        if name in store:
            store.move_to_end(name)
        elif create:
            store[name] = {}
            while len(store) > self.limits[kind]:
                store.popitem(last=False)
        return store.get(name)

    def load_images(self, key: dict[str, Any], start: int, end: int
                    ) -> tuple[torch.Tensor, list[int], list[dict[str, str]]] | None:
        """As `FeatureCache.load_images`: the chunk ``[start, end)``, or None."""
        return (self._entries("images", key, create=False) or {}).get((start, end))

    def store_images(self, key: dict[str, Any], start: int, end: int, features: torch.Tensor,
                     indices: Sequence[int], skipped: list[dict[str, str]]) -> None:
        """Keep the chunk ``[start, end)`` (on the CPU, as the disk cache returns it)."""
        self._entries("images", key, create=True)[(start, end)] = (
            features.detach().to("cpu", torch.float32), list(indices), list(skipped))

    def load_texts(self, key: dict[str, Any], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """As `FeatureCache.load_texts`: the features of those of `wanted` held."""
        held = self._entries("texts", key, create=False) or {}
        return {t: held[t] for t in wanted if t in held}

    def store_texts(self, key: dict[str, Any], texts: Sequence[str], features: torch.Tensor) -> None:
        """Keep the features of `texts`."""
        self._entries("texts", key, create=True).update(zip(texts, features.detach().to("cpu", torch.float32)))

    def load_table(self, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """As `FeatureCache.load_table`: the prompt table's tensors, or None."""
        return (self._entries("tables", key, create=False) or {}).get("tensors")

    def store_table(self, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Keep a prompt table's tensors."""
        self._entries("tables", key, create=True)["tensors"] = dict(tensors)


# --- `promptbench cache info|clear` --------------------------------------------------------
_ENTRY_PATTERNS = {
    "images": re.compile(r"images/[0-9a-f]{24}/\d{9}-\d{9}\.safetensors"),
    "texts": re.compile(r"texts/[0-9a-f]{24}/[0-9a-f]{24}\.safetensors"),
    "prompts": re.compile(r"prompts/[0-9a-f]{24}\.safetensors"),
    "few-shot": re.compile(r"[0-9a-f]{16}_shot\d+_seed-?\d+\.json"),
}
_TEMPORARY = re.compile(r"((images|texts)/[0-9a-f]{24}/|prompts/)?\.[^/]+\.tmp")


@dataclass
class CacheContents:
    """What a cache folder holds: this package's entries by kind, and anything else."""

    root: Path
    entries: dict[str, list[Path]] = field(default_factory=dict)
    other: list[Path] = field(default_factory=list)

    def size(self, kind: str) -> int:
        return sum(p.stat().st_size for p in self.entries.get(kind, []))


def cache_contents(root: Path, kinds: Sequence[str]) -> CacheContents:
    """The entries of `kinds` (``images``, ``texts``, ``few-shot``) under `root`, told apart from
    other files by their names (which only this package writes) and left-over temporary files."""
    contents = CacheContents(Path(root), {kind: [] for kind in kinds})
    if not contents.root.is_dir():
        return contents
    for path in sorted(p for p in contents.root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(contents.root).as_posix()
        kind = next((k for k in kinds if _ENTRY_PATTERNS[k].fullmatch(rel)), None)
        if kind is not None and not path.is_symlink():
            contents.entries[kind].append(path)
        elif _TEMPORARY.fullmatch(rel):
            contents.entries.setdefault("temporary", []).append(path)
        else:
            contents.other.append(path)
    return contents


def clear_cache(contents: CacheContents) -> int:
    """Remove the entries of `contents` (never its other files) and the folders they leave empty;
    return the number of files removed."""
    removed = 0
    for paths in contents.entries.values():
        for path in paths:
            path.unlink(missing_ok=True)
            removed += 1
    for folder in sorted({p.parent for paths in contents.entries.values() for p in paths}, reverse=True):
        for empty in (folder, folder.parent):  # the key folder, then images/ or texts/
            if empty != contents.root and empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
    return removed
