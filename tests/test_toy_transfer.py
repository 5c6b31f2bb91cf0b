"""The toy world's transfer targets: other classes (cross-dataset) and shifted domains (DG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.errors import UserError
from promptbench_vlm.evaluate import encode_images, encode_texts
from promptbench_vlm.learners import build_learner
from promptbench_vlm.toy.shapes import CLASSNAMES, COLOURS, SHAPES, ToyShapes
from promptbench_vlm.toy.transfer import DOMAINS, TARGETS

SPECS = [*TARGETS, *(f"toy-shapes:{d}" for d in DOMAINS)]


@pytest.mark.parametrize("spec", SPECS)
def test_targets_are_deterministic_and_never_toy_shapes_images(spec):
    ds = load_dataset(spec)
    again = load_dataset(spec)
    assert ds.fingerprint() == again.fingerprint() and ds.describe(5) == f"{spec}/test/5"
    assert np.array_equal(np.asarray(ds.load(5)), np.asarray(again.load(5)))
    assert not np.array_equal(np.asarray(ds.load(5)), np.asarray(ToyShapes("test").load(5)))
    train = load_dataset(spec, DatasetOptions(split="train"))
    assert not np.array_equal(np.asarray(ds.load(5)), np.asarray(train.load(5)))
    assert ds.labels[: 2 * len(ds.classnames)] == list(range(len(ds.classnames))) * 2  # every prefix balanced


def test_cross_dataset_targets_have_classes_of_their_own():
    colours, forms = load_dataset("toy-colours"), load_dataset("toy-forms")
    assert colours.classnames == sorted(COLOURS) and forms.classnames == sorted(SHAPES)
    assert not set(colours.classnames + forms.classnames) & set(CLASSNAMES)
    assert len(colours) == 8 * 60 and len(forms) == 6 * 60


def test_subset_domains_map_their_classes_to_toy_shapes_labels():
    for domain in ("hard", "rendition"):
        ds = load_dataset(f"toy-shapes:{domain}")
        assert len(ds.classnames) == 24 and ds.source_labels == list(range(0, 48, 2))
        assert [CLASSNAMES[i] for i in ds.source_labels] == ds.classnames
    full = load_dataset("toy-shapes:sketch")
    assert full.classnames == CLASSNAMES and full.source_labels == list(range(48))


def test_the_rendition_domain_is_lit_cool_and_the_others_warm():
    def blue_over_red(spec: str) -> float:
        ds = load_dataset(spec)
        pixels = np.stack([np.asarray(ds.load(i), dtype=np.float64) for i in range(96)])
        return pixels[..., 2].mean() / pixels[..., 0].mean()

    assert blue_over_red("toy-shapes:rendition") > 1.1 > 0.9 > blue_over_red("toy-shapes:v2")


def test_an_unknown_domain_lists_the_known_ones():
    with pytest.raises(UserError, match="Did you mean 'sketch'.*hard"):
        load_dataset("toy-shapes:skech")


def test_toy_clip_recognises_every_target_above_chance_yet_shifted():
    """The targets are meaningful for the shipped checkpoint: zero-shot ("a photo of a {}.") well
    above chance on each, below the source on the harder domains (docs/toy-world.md)."""
    torch.manual_seed(0)
    learner = build_learner("zeroshot", load_backbone("toy-clip", None, device="cpu"))

    def accuracy(spec: str) -> float:
        ds = load_dataset(spec)
        feats, labels, _ = encode_images(learner, ds)
        text = encode_texts(learner, [f"a photo of a {c}." for c in ds.classnames])
        return 100.0 * (feats @ text.T).argmax(1).eq(torch.as_tensor(labels)).float().mean().item()

    source = accuracy("toy-shapes")
    acc = {spec: accuracy(spec) for spec in SPECS}
    chance = {spec: 100.0 / len(load_dataset(spec).classnames) for spec in SPECS}
    assert all(acc[s] > 2.5 * chance[s] for s in SPECS), (acc, chance)
    assert acc["toy-shapes:sketch"] < source - 3 and acc["toy-shapes:hard"] < source - 3, (source, acc)
