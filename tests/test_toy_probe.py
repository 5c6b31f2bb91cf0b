"""The linear-probe diagnostic: it fits the frozen features and compares them with zero-shot."""

from __future__ import annotations

import sys

import pytest
from conftest import TINY_CONFIG, write_colour_folder

from promptbench_vlm.toy.probe import WEIGHT_DECAYS, main, probe_report


def test_probe_separates_what_an_untrained_text_tower_cannot(tmp_path):
    """On a random tiny CLIP, flat colours are linearly separable in image-feature space while
    zero-shot is near chance: the probe must find the room that zero-shot leaves."""
    for split, (n, offset) in {"train": (12, 0), "val": (4, 40), "test": (8, 60)}.items():
        write_colour_folder(tmp_path / split, per_class=n, class_stride=100, offset=offset)
    report = probe_report(str(TINY_CONFIG), f"folder:{tmp_path}", subset="all", steps=300)
    assert report.n_classes == 4 and report.train_images == 48
    assert report.weight_decay in WEIGHT_DECAYS
    assert report.probe_test >= 90.0, report
    assert report.probe_test >= report.zero_shot_test + 30.0, report


def test_bad_dataset_is_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["probe", "--dataset", "nope"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Valid: coop, folder" in err


def test_candidate_weights_are_passed_to_the_backbone(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "candidate.safetensors"
    monkeypatch.setattr(sys, "argv", ["probe", "--pretrained", str(missing)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"weights file not found: {missing}" in err
