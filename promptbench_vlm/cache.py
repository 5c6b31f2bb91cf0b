"""On-disk feature cache: image features per chunk of images, text features per prompt string.

Image features never depend on the template, so a re-run with other templates or perturbations
needs none of them recomputed; text features of one text encoder never depend on the dataset.
Entries are safetensors files (never a pickle) written atomically, each carrying the full key it
was computed under as JSON metadata:

- images: ``images/<key digest>/<start>-<end>.safetensors`` holds the features and item indices
  of the readable images in ``[start, end)`` and the skipped ones. The key: backbone weights hash,
  the class whose ``encode_images`` ran, the learned state (only for learners whose image side is
  learned), the preprocessing, the dataset fingerprint, the split and the numeric precision.
- texts: ``texts/<key digest>/<segment digest>.safetensors`` holds features of a list of prompt
  strings. The key: backbone weights hash, learner, options and learned state, and precision.
- prompts: ``prompts/<key digest>.safetensors`` holds a prompt table (`prompts.PromptTable`),
  whose pure-Python build costs more than loading it. The key: templates, class names,
  perturbation specs, draws, seed, lexicon content and the code hash of the perturbation ops.

A chunk of images and a segment of texts are also the units a killed run resumes from: they are
written as soon as they are computed. An entry that cannot be read, or whose stored key or shapes
disagree with what is expected, is stale or corrupt: it is reported (a `CacheWarning`) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_path

FORMAT = "promptbench_vlm.features/1"
CHUNK_IMAGES = 256
"""Images per cache chunk: the unit of caching, resuming and sharding across ranks."""
SEGMENT_TEXTS = 2048
"""Prompt strings per text segment: the unit a killed run's text encoding resumes from."""


class CacheWarning(UserWarning):
    """A cache entry was stale or corrupt and is being rebuilt."""


def digest(value: Any) -> str:
    """A short SHA-256 of a JSON-serialisable value (sorted keys): stable across runs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over named tensors, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _encoder(learner: Any, method: str) -> str:
    """The qualified name of the class that defines `method`: the code that computes features."""
    func = getattr(type(learner), method)
    return f"{func.__module__}.{func.__qualname__}"


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
        meta = {"format": FORMAT, "key": key, **extra}
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
        return tensors, meta
