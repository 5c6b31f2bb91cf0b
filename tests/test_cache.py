"""The feature cache: warm runs encode nothing, keys separate what must differ, bad entries rebuild."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import COLOURS, TINY_CONFIG, ColourDataset, write_colour_folder
from PIL import Image
from test_cli import run_cli
from test_evaluate import TEMPLATES, CountingLearner

from promptbench_vlm import evaluate
from promptbench_vlm.cache import CacheWarning, FeatureCache, MemoryCache, code_hash, image_key, text_key
from promptbench_vlm.data.folder import FolderDataset
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


def test_memory_cache_serves_a_second_run_and_keeps_only_the_latest_keys(tiny_backbone):
    learner = build_learner("zeroshot", tiny_backbone)
    counter = CountingLearner(learner)
    memory = MemoryCache(image_keys=1, text_keys=1)
    cold = Evaluator(learner, SETTINGS, cache=memory, split="test").run(ColourDataset(corrupt=(2,)))
    counter.images, counter.texts = 0, []
    warm = Evaluator(learner, SETTINGS, cache=memory, split="test").run(ColourDataset(corrupt=(2,)))
    assert counter.images == 0 and counter.texts == [] and warm.counts["images_cached"] == 11
    results_equal(cold, warm)
    Evaluator(learner, SETTINGS, cache=memory, split="val").run(ColourDataset())  # another image key
    counter.images = 0
    Evaluator(learner, SETTINGS, cache=memory, split="test").run(ColourDataset(corrupt=(2,)))
    assert counter.images == 11  # the oldest image key went; the texts (one learner state) stayed
    assert counter.texts == []


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
                               str(tmp_path / "r.json"), "--overwrite")
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


def _evaluate_in(folder, monkeypatch, capsys, *extra):
    """`promptbench evaluate --dataset folder:data` run from `folder`; the result document."""
    monkeypatch.chdir(folder)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", str(TINY_CONFIG), "--dataset", "folder:data",
                           "--templates", "single", "--perturb", "none", "--bootstrap", "0", "--output", "r.json",
                           "--overwrite", *extra)
    assert code == 0, err
    return read_result(folder / "r.json")["subsets"]["all"]


def test_same_spec_in_two_projects_never_shares_features(monkeypatch, capsys, tmp_path):
    """Project B's images are project A's with the colours moved to other classes: same class and
    file names, same `folder:data` spec, other pixels. Each gets its own features."""
    write_colour_folder(tmp_path / "a" / "data", per_class=2, class_stride=10)
    write_colour_folder(tmp_path / "b" / "data", per_class=2, class_stride=10)
    names = list(COLOURS)
    for i, name in enumerate(names):  # b/data/<class> holds the images of the next class in a/data
        for image in (tmp_path / "a" / "data" / names[(i + 1) % len(names)]).iterdir():
            (tmp_path / "b" / "data" / name / image.name).write_bytes(image.read_bytes())
    a = _evaluate_in(tmp_path / "a", monkeypatch, capsys)
    b = _evaluate_in(tmp_path / "b", monkeypatch, capsys)
    assert b["counts"]["images_encoded"] == 8  # nothing taken from A's entries
    fresh = _evaluate_in(tmp_path / "b", monkeypatch, capsys, "--no-cache")
    assert b["per_image"] == fresh["per_image"] and b["metrics"] == fresh["metrics"]
    assert a["per_image"] != b["per_image"]
    again = _evaluate_in(tmp_path / "a", monkeypatch, capsys)
    assert again["counts"]["images_cached"] == 8 and again["metrics"] == a["metrics"]


def test_an_image_edited_in_place_gets_new_features(tiny_backbone, image_folder, tmp_path):
    dataset = FolderDataset(image_folder)
    before = dataset.fingerprint()
    path = dataset.paths[0]
    Image.new("RGB", (32, 32), (0, 0, 0)).save(path)
    os.utime(path, ns=(1, 1))  # even with an old time stamp: the size or the time differs
    assert FolderDataset(image_folder).fingerprint() != before


def test_flipped_bytes_inside_a_cached_tensor_are_detected_and_rebuilt(tiny_backbone, tmp_path):
    learner = build_learner("zeroshot", tiny_backbone)
    reference = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())
    (chunk,) = (tmp_path / "images").rglob("*.safetensors")
    raw = bytearray(chunk.read_bytes())
    middle = len(raw) - 200  # inside the feature tensor, far from the JSON header
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    chunk.write_bytes(bytes(raw))
    counter = CountingLearner(learner)
    with pytest.warns(CacheWarning, match="checksums"):
        rebuilt = Evaluator(learner, SETTINGS, cache=FeatureCache(tmp_path)).run(ColourDataset())
    assert counter.images == len(ColourDataset())
    results_equal(reference, rebuilt)


PLUGIN = '''
from promptbench_vlm.learners.zeroshot import ZeroShotLearner


class Plugged(ZeroShotLearner):
    name = "plugged"

    def encode_texts(self, texts, image_features=None):
        return {body}
'''


def test_editing_a_plugin_encoder_invalidates_its_entries(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "plugged_learner.py"
    module.write_text(PLUGIN.format(body="super().encode_texts(texts, image_features)"))
    import importlib

    plugged = importlib.import_module("plugged_learner")
    keys = [text_key(plugged.Plugged(tiny_backbone), "cpu-float32")]
    keys.append(text_key(plugged.Plugged(tiny_backbone), "cpu-float32"))
    module.write_text(PLUGIN.format(body="-super().encode_texts(texts, image_features)"))
    plugged = importlib.reload(plugged)
    keys.append(text_key(plugged.Plugged(tiny_backbone), "cpu-float32"))
    assert keys[0] == keys[1] != keys[2]
    assert image_key(plugged.Plugged(tiny_backbone), ColourDataset(), "test", "cpu-float32")["encoder"]["code"] == \
        code_hash(plugged.Plugged)
    plugged.Plugged.cache_version = "2"  # a declared version replaces the source hash
    assert text_key(plugged.Plugged(tiny_backbone), "cpu-float32")["encoder"]["code"] == "declared:2"


def test_cache_info_and_clear_touch_only_our_entries(monkeypatch, capsys, tiny_backbone, private_cache):
    root = private_cache / "features"
    Evaluator(build_learner("zeroshot", tiny_backbone), SETTINGS, cache=FeatureCache(root)).run(ColourDataset())
    (root / "images" / "notes.txt").write_text("mine")
    (private_cache / "fewshot").mkdir()
    (private_cache / "fewshot" / "0123456789abcdef_shot4_seed1.json").write_text("{}")
    (private_cache / "fewshot" / "keep.json").write_text("{}")
    code, out, err = run_cli(monkeypatch, capsys, "cache", "info")
    assert code == 0, err
    assert re.search(r"images\s+1 file", out) and re.search(r"few-shot\s+1 file", out) and "1 other file" in out
    code, _, err = run_cli(monkeypatch, capsys, "cache", "clear")
    assert code == 0 and "left alone" in err, err
    left = sorted(p.relative_to(private_cache).as_posix() for p in private_cache.rglob("*") if p.is_file())
    assert left == ["features/images/notes.txt", "fewshot/keep.json"]
