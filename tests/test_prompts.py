"""The prompt table stored with the features: same table back, rebuilt when stale or corrupt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from promptbench_vlm import prompts
from promptbench_vlm.cache import FeatureCache
from promptbench_vlm.perturb import load_lexicon, parse_perturbations
from promptbench_vlm.prompts import PromptTable, build_prompt_table, prompt_table, table_key

TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.", "itap of my {}.")
CLASSES = ("dog", "Bichon Frisé", "crème brûlée", "fire truck")
SPECS = tuple(parse_perturbations("synonym:0.5,drop:strong,shuffle:weak"))


def assert_same_table(a: PromptTable, b: PromptTable) -> None:
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.clean, b.clean)
    for x, y in zip(a.perturbed + a.edits, b.perturbed + b.edits, strict=True):
        np.testing.assert_array_equal(x, y)


def build(cache=None, draws: int = 2, lexicon=None) -> PromptTable:
    return prompt_table(TEMPLATES, CLASSES, SPECS, draws, 7, lexicon or load_lexicon(), cache)


def test_tensors_round_trip_keeps_every_string():
    table = build()
    assert any(not t.isascii() for t in table.texts)
    assert_same_table(PromptTable.from_tensors(table.to_tensors(), len(SPECS)), table)


def test_a_stored_table_is_loaded_without_perturbing(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = build(cache)
    assert_same_table(first, build_prompt_table(TEMPLATES, CLASSES, SPECS, 2, 7, load_lexicon()))
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 1

    def no_perturbing(*args, **kwargs):
        raise AssertionError("the stored table should have been used")

    monkeypatch.setattr(prompts, "perturb_many", no_perturbing)
    assert_same_table(build(cache), first)
    with pytest.raises(AssertionError, match="stored table"):
        build(cache, draws=3)  # another key: built, not loaded


def test_the_key_follows_the_lexicon_and_the_arguments():
    lexicon = load_lexicon()
    base = table_key(TEMPLATES, CLASSES, SPECS, 2, 7, lexicon)
    assert base == table_key(TEMPLATES, CLASSES, SPECS, 2, 7, load_lexicon())
    assert base != table_key(TEMPLATES, CLASSES, SPECS, 2, 7, dataclasses.replace(lexicon, mask_token="<m>"))
    assert base != table_key(TEMPLATES, CLASSES[:3], SPECS, 2, 7, lexicon)
    assert base != table_key(TEMPLATES, CLASSES, SPECS[:2], 2, 7, lexicon)


@pytest.mark.parametrize("module", ["perturb", "articles", "prompts"])
def test_the_key_follows_the_code_the_strings_come_from(tmp_path, monkeypatch, module):
    # an edit of the ops, of the article rule or of the table build must not find a table it did not build
    from importlib import import_module

    base = table_key(TEMPLATES, CLASSES, SPECS, 2, 7, load_lexicon())
    source = import_module(f"promptbench_vlm.{module}")
    edited = tmp_path / f"{module}.py"
    edited.write_text(Path(source.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(source, "__file__", str(edited))
    prompts._code_hash.cache_clear()
    try:
        assert table_key(TEMPLATES, CLASSES, SPECS, 2, 7, load_lexicon())["code"] != base["code"]
    finally:
        monkeypatch.undo()
        prompts._code_hash.cache_clear()


def test_a_corrupt_or_unfit_table_is_reported_and_rebuilt(tmp_path):
    messages: list[str] = []
    cache = FeatureCache(tmp_path, warn=messages.append)
    reference = build(cache)
    path = next((tmp_path / "prompts").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    assert_same_table(build(cache), reference)
    assert "corrupt" in messages[-1]

    key = table_key(TEMPLATES, CLASSES, SPECS, 2, 7, load_lexicon())
    tensors = reference.to_tensors()
    tensors["clean"] = tensors["clean"] + len(reference.texts)  # rows past the end of the strings
    cache.store_table(key, tensors)
    assert_same_table(build(cache), reference)
    assert "does not fit" in messages[-1]
