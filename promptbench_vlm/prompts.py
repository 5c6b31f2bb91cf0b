"""The prompt table: every prompt string an evaluation needs, deduplicated, with index arrays.

Filling T templates with C class names and perturbing each filled prompt R times per spec is pure
Python (each perturbation seeds its own generator from a SHA-256 of the prompt, about a third
of its CPU; see `perturb`): 9 s for 60 templates x 1,000 classes x the 10 default specs
(docs/speed.md). So the table is built once and kept: under torchrun the ranks build shares of it
and gather them (every rank ends with the table one process builds); with a feature cache it is
stored beside the features, keyed by everything it depends on, including the code of `perturb`,
of the article rule it applies and of this module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import articles, distributed
from . import perturb as perturb_module
from .cache import FeatureCache, digest
from .perturb import Lexicon, PerturbSpec, fill_template, perturb_many


@dataclass
class PromptTable:
    """Every prompt string the evaluation needs, deduplicated, with index arrays into it.

    Attributes:
        texts: The unique prompt strings, in first-seen order.
        clean: ``[T, C]`` row of each filled clean template.
        perturbed: Per perturbation spec, ``[T, R, C]`` rows of the perturbed prompts.
        edits: Per perturbation spec, ``[T, R, C]`` edits made; 0 where the op found no candidate.
    """

    texts: list[str]
    clean: np.ndarray
    perturbed: list[np.ndarray]
    edits: list[np.ndarray]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The table as named tensors (strings as UTF-8 bytes and offsets) for a safetensors file."""
        encoded = [t.encode("utf-8") for t in self.texts]
        offsets = np.cumsum([0] + [len(b) for b in encoded])
        out = {"text_bytes": torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8),
               "text_offsets": torch.from_numpy(offsets.astype(np.int64)), "clean": torch.from_numpy(self.clean)}
        for k, (rows, made) in enumerate(zip(self.perturbed, self.edits)):
            out[f"perturbed_{k}"], out[f"edits_{k}"] = torch.from_numpy(rows), torch.from_numpy(made)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_specs: int) -> PromptTable:
        """Inverse of `to_tensors`."""
        data, offsets = tensors["text_bytes"].numpy().tobytes(), tensors["text_offsets"].tolist()
        texts = [data[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:])]
        return cls(texts, tensors["clean"].numpy(), [tensors[f"perturbed_{k}"].numpy() for k in range(n_specs)],
                   [tensors[f"edits_{k}"].numpy() for k in range(n_specs)])


def draw_seed(seed: int, draw: int) -> int:
    """The perturbation seed of draw `draw`: distinct per draw, stable across runs."""
    return seed * 1_000_003 + draw


def _perturb_cell(filled: list[tuple[str, tuple[int, int]]], spec: PerturbSpec, draws: int, seed: int,
                  lexicon: Lexicon) -> list[list[tuple[str, int]]]:
    """``[R][C]`` (perturbed text, edits) of one template's filled prompts under one spec."""
    return [[(out.text, out.n_edits) for out in perturb_many(filled, spec.op, spec.amount, draw_seed(seed, r), lexicon)]
            for r in range(draws)]


def build_prompt_table(
    templates: Sequence[str],
    classnames: Sequence[str],
    perturbations: Sequence[PerturbSpec],
    draws: int,
    seed: int,
    lexicon: Lexicon,
) -> PromptTable:
    """Fill every template with every class, perturb each filled prompt, and deduplicate.

    The (spec, template) cells of perturbation work are shared out across torchrun ranks and
    gathered; strings are numbered in the order one process meets them, so the table is the same
    on every rank and in every world size.
    """
    index: dict[str, int] = {}

    def row(text: str) -> int:
        return index.setdefault(text, len(index))

    filled = [[fill_template(t, c) for c in classnames] for t in templates]
    clean = np.array([[row(text) for text, _ in per_class] for per_class in filled], dtype=np.int64)
    cells = [(k, t) for k in range(len(perturbations)) for t in range(len(templates))]
    mine = [cells[i] for i in distributed.shard_range(len(cells))]
    done = {cell: _perturb_cell(filled[cell[1]], perturbations[cell[0]], draws, seed, lexicon) for cell in mine}
    for other in distributed.gather(done):
        done.update(other)
    shape = (len(templates), draws, len(classnames))
    perturbed = [np.empty(shape, dtype=np.int64) for _ in perturbations]
    edits = [np.zeros(shape, dtype=np.int32) for _ in perturbations]
    for k, t in cells:
        for r, outs in enumerate(done[k, t]):
            perturbed[k][t, r] = [row(text) for text, _ in outs]
            edits[k][t, r] = [made for _, made in outs]
    return PromptTable(list(index), clean, perturbed, edits)


@functools.cache
def _code_hash() -> str:
    """SHA-256 (16 hex digits) of the code a table's strings come from: `perturb`, the article
    rule it applies, and this module."""
    h = hashlib.sha256()
    for module_file in (perturb_module.__file__, articles.__file__, __file__):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()[:16]


def _lexicon_content(lexicon: Lexicon) -> dict[str, Any]:
    """The lexicon's word lists in a stable JSON-ready form (sets sorted: their order is salted)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(lexicon):
        if f.init:
            value = getattr(lexicon, f.name)
            out[f.name] = sorted(value) if isinstance(value, (set, frozenset)) else (
                dict(value) if hasattr(value, "items") else value)
    return out


def table_key(templates: Sequence[str], classnames: Sequence[str], perturbations: Sequence[PerturbSpec], draws: int,
              seed: int, lexicon: Lexicon) -> dict[str, Any]:
    """Everything a prompt table depends on: its arguments and the code that builds it."""
    return {
        "templates": list(templates),
        "classnames": list(classnames),
        "perturbations": [[spec.op, spec.rate, spec.level] for spec in perturbations],
        "draws": draws,
        "seed": seed,
        "lexicon": digest(_lexicon_content(lexicon)),
        "code": _code_hash(),
    }


def _stored_table(cache: FeatureCache, key: dict[str, Any], shape: tuple[int, int, int], n_specs: int
                  ) -> PromptTable | None:
    """The table stored under `key`, or None when absent or unfit (reported, then rebuilt)."""
    stored = cache.load_table(key)
    if stored is None:
        return None
    try:
        table = PromptTable.from_tensors(stored, n_specs)
    except (KeyError, UnicodeDecodeError, ValueError) as err:
        cache.warn(f"stored prompt table is corrupt ({type(err).__name__}: {err}); rebuilding it")
        return None
    arrays = (table.clean, *table.perturbed)
    if (table.clean.shape != shape[::2] or any(p.shape != shape or e.shape != shape
                                                for p, e in zip(table.perturbed, table.edits))
            or any(a.size and not 0 <= a.min() <= a.max() < len(table.texts) for a in arrays)):
        cache.warn("stored prompt table does not fit its key; rebuilding it")
        return None
    return table


def prompt_table(templates: Sequence[str], classnames: Sequence[str], perturbations: Sequence[PerturbSpec],
                 draws: int, seed: int, lexicon: Lexicon, cache: FeatureCache | None = None) -> PromptTable:
    """`build_prompt_table`, or the table a previous run stored in `cache` under the same key.

    Rank 0 alone reads the cache and hands the table to the others, so all ranks agree on whether
    to build it (together) or not.
    """
    if cache is None:
        return build_prompt_table(templates, classnames, perturbations, draws, seed, lexicon)
    key = table_key(templates, classnames, perturbations, draws, seed, lexicon)
    shape = (len(templates), draws, len(classnames))
    table = distributed.main_only(lambda: _stored_table(cache, key, shape, len(perturbations)))
    if table is None:
        table = build_prompt_table(templates, classnames, perturbations, draws, seed, lexicon)
        if distributed.is_main():
            cache.store_table(key, table.to_tensors())
    return table
