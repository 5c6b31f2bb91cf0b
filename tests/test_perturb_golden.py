"""Every perturbed string, its edit count and class span equal those of the perturbation code before
the batched prompt-table build (issue 22): `tests/data/perturb-golden.json` holds SHA-256 digests
of the outputs that code gave for the 60 templates x CoOp-like, ImageNet, multi-word, non-ASCII and
template-word class names, every default op and level plus explicit rates, and several seeds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from conftest import COOP_NAMES

from promptbench_vlm.perturb import OPS, PerturbSpec, fill_template, load_lexicon, parse_perturbations, perturb
from promptbench_vlm.prompts import build_prompt_table, draw_seed
from promptbench_vlm.templates import load_templates

GOLDEN = Path(__file__).parent / "data" / "perturb-golden.json"
HARD_NAMES = ["Bichon Frisé", "crème brûlée", "naïve café", "Pokémon", "cafÃ©", "fish &amp; chips", "“quoted” dog",
              "ﬁsh", "ＦＵＬＬ width", "tab\there", "line\r\nbreak", "nbsp\xa0space", "日本の犬", "emoji 🐕 dog",
              "  padded  ", "Ærø ferry", "ß strasse"]
# class names made of template words, lexicon keys, articles, the mask token, final punctuation
WORD_NAMES = ["a", "A", "an", "photo", "image of", "black and white", "the the", "[MASK]", "dog.", "St. Bernard",
              "Mr. T", "it's", "'quoted'", "x", "hour", "unicorn", "origami", "a a", "(dog)"]
CLASSNAMES = COOP_NAMES + HARD_NAMES + WORD_NAMES + list(IMAGENET_CLASSNAMES[::100])
DEFAULT = parse_perturbations("default")
RATES = [PerturbSpec(op, rate) for op in OPS for rate in (0.3, 1.0)]
SEEDS = {"default": (draw_seed(0, 0), draw_seed(7, 3)), "rates": (draw_seed(1, 0),)}


def _digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def _perturbed(spec: PerturbSpec, seed: int, lexicon) -> str:
    filled = [fill_template(t, c) for t in load_templates().templates for c in CLASSNAMES]
    outs = [perturb(text, span, spec.op, spec.amount, seed, lexicon) for text, span in filled]
    return _digest([out.text, out.n_edits, list(out.class_span)] for out in outs)


def _table(lexicon) -> str:
    table = build_prompt_table(load_templates().templates, CLASSNAMES, DEFAULT, 2, 3, lexicon)
    return _digest([table.texts, table.clean.tolist(), [p.tolist() for p in table.perturbed],
                    [np.asarray(e).tolist() for e in table.edits]])


def golden() -> dict[str, str]:
    """The digests the current code gives (what `GOLDEN` stores)."""
    lexicon = load_lexicon()
    out = {f"{spec.label}@{seed}": _perturbed(spec, seed, lexicon)
           for group, specs in (("default", DEFAULT), ("rates", RATES)) for spec in specs for seed in SEEDS[group]}
    out["table"] = _table(lexicon)
    return out


@pytest.fixture(scope="module")
def stored() -> dict[str, str]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.mark.parametrize("spec", DEFAULT + RATES, ids=lambda s: s.label)
def test_perturbed_strings_equal_the_stored_ones(spec, stored):
    lexicon = load_lexicon()
    for seed in SEEDS["default" if spec in DEFAULT else "rates"]:
        assert _perturbed(spec, seed, lexicon) == stored[f"{spec.label}@{seed}"], (spec.label, seed)


def test_prompt_table_equals_the_stored_one(stored):
    assert _table(load_lexicon()) == stored["table"]


if __name__ == "__main__":  # writes the golden file: only ever from the code the digests must pin
    GOLDEN.write_text(json.dumps(golden(), indent=1) + "\n", encoding="utf-8")
