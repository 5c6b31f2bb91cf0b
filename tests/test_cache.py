"""The feature cache: warm runs encode nothing, keys separate what must differ, bad entries rebuild."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIG, ColourDataset
from test_cli import run_cli
from test_evaluate import TEMPLATES, CountingLearner

from promptbench_vlm import evaluate
from promptbench_vlm.cache import CacheWarning, FeatureCache, image_key, text_key
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import parse_perturbations
from promptbench_vlm.results import read_result, subset_to_dict

SETTINGS = EvalSettings(templates=TEMPLATES, perturbations=tuple(parse_perturbations("drop:strong")), bootstrap=20)


def results_equal(a, b) -> None:
    """Two subset results agree in every field but how the run went (timings, counts)."""
    da, db = subset_to_dict(a), subset_to_dict(b)
    for doc in (da, db):
        doc.pop("timings"), doc.pop("counts")
    assert da == db


def test_warm_cache_encodes_no_image_and_no_text(tiny_backbone, tmp_path):
    learner = build_learner("zeroshot", tiny_backbone)
    counter = CountingLearner(learner)
    dataset = ColourDataset(corrupt=(2,))
    cold = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path), split="test").run(dataset)
    assert counter.images == len(dataset) - 1 and counter.texts
    counter.images, counter.texts = 0, []
    warm = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path), split="test").run(dataset)
    assert counter.images == 0 and counter.texts == []
    assert warm.counts == {"images_encoded": 0, "texts_encoded": 0, "images_cached": 11,
                           "texts_cached": cold.counts["texts_encoded"]}
    results_equal(cold, warm)
    assert warm.skipped == cold.skipped == [{"item": "colours/2", "error": "colours/2: cannot identify image file"}]


def test_other_templates_reuse_image_features_and_shared_prompts(tiny_backbone, tmp_path):
    learner = build_learner("zeroshot", tiny_backbone)
    counter = CountingLearner(learner)
    Evaluator(learner, EvalSettings(templates=TEMPLATES[:2], bootstrap=0), cache=FeatureCache(tmp_path)).run(
        ColourDataset())
    counter.images, counter.texts = 0, []
    result = Evaluator(learner, EvalSettings(templates=TEMPLATES, bootstrap=0), cache=FeatureCache(tmp_path)).run(
        ColourDataset())
    assert counter.images == 0
    classes = ColourDataset().classnames
    assert sorted(counter.texts) == sorted(t.replace("{}", c) for t in TEMPLATES[2:] for c in classes)
    uncached = Evaluator(learner, EvalSettings(templates=TEMPLATES, bootstrap=0)).run(ColourDataset())
    results_equal(result, uncached)


def test_keys_separate_what_changes_features(tiny_backbone):
    dataset = ColourDataset()
    coop = build_learner("coop", tiny_backbone)
    key = image_key(coop, dataset, "test", "cpu-float32")
    text = text_key(coop, "cpu-float32")
    with torch.no_grad():
        next(p for p in coop.parameters() if p.requires_grad).add_(1.0)
    assert image_key(coop, dataset, "test", "cpu-float32") == key  # a frozen image side is shared by all states
    assert text_key(coop, "cpu-float32") != text  # but prompt features depend on the learned context
    assert image_key(coop, dataset, "train", "cpu-float32") != key
    assert image_key(coop, ColourDataset(per_class=2), "test", "cpu-float32") != key
    assert image_key(coop, dataset, "test", "cuda-bfloat16") != key
    assert image_key(build_learner("zeroshot", tiny_backbone), dataset, "test", "cpu-float32") != key


def test_truncated_entry_is_rebuilt_with_a_warning(tiny_backbone, tmp_path):
    learner = build_learner("zeroshot", tiny_backbone)
    reference = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())
    (chunk,) = (tmp_path / "images").rglob("*.safetensors")
    segments = sorted((tmp_path / "texts").rglob("*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:-40])
    segments[0].write_bytes(segments[0].read_bytes()[:30])
    counter = CountingLearner(learner)
    with pytest.warns(CacheWarning, match="corrupt") as caught:
        rebuilt = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())
    assert {str(chunk), str(segments[0])} <= {str(w.message).split()[3] for w in caught}
    assert counter.images == len(ColourDataset())
    results_equal(reference, rebuilt)
    counter.images = 0
    Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())  # the rebuilt entry now reads
    assert counter.images == 0


def test_entry_under_another_key_is_stale(tiny_backbone, tmp_path):
    learner = build_learner("zeroshot", tiny_backbone)
    store = FeatureCache(tmp_path)
    dataset = ColourDataset()
    key = image_key(learner, dataset, "test", "cpu-float32")
    other = {**key, "split": "train"}
    store.store_images(other, 0, 12, torch.zeros(12, 4), list(range(12)), [])
    target = store._chunk_path(key, 0, 12)
    target.parent.mkdir(parents=True)
    store._chunk_path(other, 0, 12).replace(target)
    with pytest.warns(CacheWarning, match="stale"):
        assert store.load_images(key, 0, 12) is None


def test_chunks_split_the_images(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CHUNK_IMAGES", 5)
    learner = build_learner("zeroshot", tiny_backbone)
    chunked = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())
    names = sorted(p.name for p in (tmp_path / "images").rglob("*.safetensors"))
    assert names == ["000000000-000000005.safetensors", "000000005-000000010.safetensors",
                     "000000010-000000012.safetensors"]
    results_equal(chunked, Evaluator(learner, SETTINGS).run(ColourDataset()))


def test_cli_cache_dir_and_no_cache(monkeypatch, capsys, image_folder, tmp_path, private_cache):
    base = ["evaluate", "--model", str(TINY_CONFIG), "--dataset", f"folder:{image_folder}", "--templates", "single",
            "--perturb", "drop:weak", "--bootstrap", "0"]
    cache_dir = tmp_path / "features"
    for expected in ({"images_encoded": 12, "images_cached": 0}, {"images_encoded": 0, "images_cached": 12}):
        code, _, err = run_cli(monkeypatch, capsys, *base, "--cache-dir", str(cache_dir), "--output",
                               str(tmp_path / "r.json"))
        assert code == 0, err
        counts = read_result(tmp_path / "r.json")["subsets"]["all"]["counts"]
        assert {k: counts[k] for k in expected} == expected
    assert any((cache_dir / "images").iterdir())
    code, _, err = run_cli(monkeypatch, capsys, *base, "--no-cache", "--output", str(tmp_path / "n.json"))
    assert code == 0, err
    counts = read_result(tmp_path / "n.json")["subsets"]["all"]["counts"]
    assert set(counts) == {"images_encoded", "texts_encoded"} and counts["images_encoded"] == 12
    assert not any(private_cache.iterdir())  # --no-cache wrote nothing to the default cache either
    code, _, err = run_cli(monkeypatch, capsys, *base, "--output", str(tmp_path / "d.json"))
    assert code == 0 and (private_cache / "features" / "images").is_dir()  # the default: the user cache dir
    assert json.loads((tmp_path / "d.json").read_text())["subsets"]["all"]["counts"]["images_cached"] == 0
