"""Presets: a paper's configuration in one word; explicit flags override it and the run records both."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_console, write_train_test_folders

from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import LEARNERS
from promptbench_vlm.presets import PRESETS, apply_preset, check_init
from promptbench_vlm.train.method import METHODS


def test_list_presets_shows_every_preset_with_values_and_source():
    proc = run_console("list", "presets")
    assert proc.returncode == 0, proc.stderr
    for name, preset in PRESETS.items():
        assert name in proc.stdout and preset.source.split(" ")[0] in proc.stdout
    assert proc.stdout.count("source: ") == len(PRESETS) == proc.stdout.count("values: ")
    for needed in ("maple-b2n", "ivlp-b2n", "promptsrc-b2n", "coop-b2n", "cocoop-b2n", "promise-ivlp-b2n",
                   "promise-maple-b2n", "promise-maple-imagenet", "mp-coop", "mp-cocoop", "mp-promptsrc",
                   "anprompt-maple-b2n"):
        assert needed in PRESETS


def test_every_preset_names_a_registered_method_and_learner():
    for preset in PRESETS.values():
        METHODS.get(preset.method)
        LEARNERS.get(preset.learner)
        assert preset.source and preset.train["model"] == "ViT-B-16" and preset.train["pretrained"] == "openai"


def test_values_follow_the_reference_configs():
    maple, src, promise = PRESETS["maple-b2n"], PRESETS["promptsrc-b2n"], PRESETS["promise-ivlp-imagenet"]
    assert (maple.learner_options["depth"], maple.learner_options["n_ctx"], maple.train["lr"],
            maple.train["epochs"], maple.train["batch_size"]) == (9, 2, 0.0035, 5, 4)
    assert (src.learner_options["n_ctx"], src.learner_options["n_ctx_v"], src.train["lr"], src.train["epochs"],
            src.method_options["gpa_mean"], src.method_options["gpa_std"]) == (4, 4, 0.0025, 20, 15.0, 1.0)
    assert (promise.learner_options["depth"], promise.train["epochs"], promise.train["subset"]) == (3, 5, "all")
    assert PRESETS["mp-cocoop"].method_options["inner_batch"] == 8
    assert PRESETS["mp-promptsrc"].method_options["inner_lr"] == pytest.approx(0.02 / 6)


def test_explicit_values_win_and_are_recorded():
    given = {"method": "erm", "learner": "coop", "epochs": 1, "batch_size": 8, "lr": None, "warmup_epochs": 1,
             "shots": 16, "subset": "base", "model": "toy-clip", "pretrained": None,
             "learner_options": {"depth": 2}, "method_options": {}}
    merged, record = apply_preset("maple-b2n", given, {"epochs", "model", "shots", "learner_options"})
    assert merged["learner"] == "maple" and merged["batch_size"] == 4 and merged["lr"] == 0.0035
    assert merged["epochs"] == 1 and merged["model"] == "toy-clip" and merged["pretrained"] is None
    assert merged["learner_options"] == {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 2}
    assert record["overridden"] == {"epochs": 1, "model": "toy-clip", "learner_options.depth": 2}
    assert record["name"] == "maple-b2n" and "vit_b16_c2_ep5_batch4_2ctx.yaml" in record["source"]
    with pytest.raises(UserError, match="Did you mean 'maple-b2n'"):
        apply_preset("maple-b2m", given, set())
    with pytest.raises(UserError, match="--init"):
        check_init("mp-coop-ft", None)


def test_train_with_a_preset_and_an_override_records_both(tmp_path):
    data = write_train_test_folders(tmp_path / "colours", train=2, test=1)
    out = tmp_path / "run"
    proc = run_console("train", "--preset", "maple-b2n", "--model", str(TINY_CONFIG), "--learner-opt", "depth=2",
                       "--epochs", "1", "--shots", "2", "--dataset", f"folder:{data}", "--eval-templates", "single",
                       "--eval-perturb", "none", "--bootstrap", "0", "--device", "cpu", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    request = json.loads((out / "train.json").read_text())["request"]
    assert request["method"] == "erm" and request["learner"] == "maple"
    assert request["config"]["batch_size"] == 4 and request["config"]["lr"] == 0.0035
    assert request["config"]["epochs"] == 1 and request["learner_options"]["depth"] == 2
    preset = request["preset"]
    assert preset["name"] == "maple-b2n" and preset["values"]["epochs"] == 5
    # as given on the command line (the typed value is in learner_options above)
    assert preset["overridden"] == {"epochs": 1, "shots": 2, "model": str(TINY_CONFIG), "learner_options.depth": "2"}


def test_unknown_preset_is_one_line():
    assert_one_line_error(run_console("train", "--preset", "mapel-b2n"), "preset", "maple-b2n")


def test_a_sweep_entry_takes_a_preset_under_its_own_settings():
    from promptbench_vlm.compare.sweep import build_sweep, plan

    sweep = build_sweep({"methods": ["zeroshot", "maple-b2n", "src"], "learners": ["coop"],
                         "method": {"maple-b2n": {"preset": "maple-b2n", "epochs": 1},
                                    "src": {"preset": "promptsrc-b2n", "learner_options": {"depth": 2}}}})
    maple, src = sweep.settings("maple-b2n"), sweep.settings("src")
    assert sweep.registered("maple-b2n") == "erm" and maple.learners == ["maple"]
    assert maple.epochs == 1 and maple.batch_size == 4 and maple.lr == 0.0035
    assert maple.preset_record["overridden"] == {"epochs": 1}
    assert sweep.registered("src") == "promptsrc" and src.learner_options["depth"] == 2
    assert src.options["gpa_mean"] == 15.0 and src.learner_options["n_ctx_v"] == 4
    runs, _ = plan(sweep)
    assert {(r.method, r.learner) for r in runs} >= {("maple-b2n", "maple"), ("src", "ivlp")}


def test_every_preset_option_is_a_declared_option():
    from promptbench_vlm.learners import check_learner_options
    from promptbench_vlm.train.method import check_method_options

    for preset in PRESETS.values():
        check_method_options(preset.method, preset.method_options)
        check_learner_options(preset.learner, preset.learner_options)
