"""The wording protocol: a seeded split by family into seen and held-out wordings, an out-of-family
set, every method trained on the seen pool only, and results on each pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_console, write_train_test_folders

from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner, learner_class
from promptbench_vlm.templates import load_templates
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.method import METHODS, build_method
from promptbench_vlm.train.run import SEEN_WORDINGS, TrainRequest, run_training
from promptbench_vlm.wordings import (HELD_OUT, INIT_WORDING, OUT_OF_FAMILY, POOLS, SEEN, WordingProtocol,
                                      WordingSplit, family_key, seen_pool_options, split_wordings, write_seen_pool)

# what each method needs beyond the protocol to be built on the tiny model (Promise's 30 + 30 tasks
# do not fit the 40 seen wordings)
EXTRA_OPTIONS = {"promise": {"templates_in": 3, "templates_out": 3}}


@pytest.fixture(scope="module")
def split() -> WordingSplit:
    return split_wordings(WordingProtocol())


def test_split_is_seeded_by_family_disjoint_and_round_trips(split):
    pool = load_templates("promptsrc60").templates
    assert not set(split.seen) & set(split.held_out) and set(split.seen) | set(split.held_out) == set(pool)
    assert (len(split.seen), len(split.held_out)) == (40, 20)
    seen_families = {family_key(t) for t in split.seen}
    assert not seen_families & {family_key(t) for t in split.held_out}  # no near-copy straddles the split
    assert family_key(INIT_WORDING) in seen_families and INIT_WORDING in split.seen
    assert not {family_key(t) for t in split.out_of_family} & {family_key(t) for t in pool}
    assert len(split.out_of_family) == 27 and not set(split.out_of_family) & set(pool)
    assert split_wordings(WordingProtocol()) == split
    assert split_wordings(WordingProtocol(seed=1)).held_out != split.held_out
    assert WordingSplit.from_dict(json.loads(json.dumps(split.to_dict()))) == split
    with pytest.raises(UserError, match="between 0 and 1"):
        split_wordings(WordingProtocol(held_out=1.0))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_on_the_seen_pool_only(name, split, tiny_backbone, tmp_path):
    cls = METHODS.get(name)
    fitting = next(n for n in ("coop", "ivlp") if not cls.missing(learner_class(n)))  # by the capabilities it needs
    learner = build_learner(fitting, tiny_backbone)
    seen_file = write_seen_pool(tmp_path / SEEN_WORDINGS, split)
    options = seen_pool_options(cls, dict(EXTRA_OPTIONS.get(name, {})), split, seen_file)
    method = build_method(name, learner, ["red", "blue"], options)
    for key in cls.template_options:  # every template set it trains on is the seen pool
        assert load_templates(method.options[key]).templates == split.seen
    unseen = set(split.held_out) | set(split.out_of_family)
    single = [v for v in method.options.values() if isinstance(v, str) and "{}" in v]
    assert not unseen & set(single)  # and no single training wording is a held-out one
    if cls.template_options:
        with pytest.raises(UserError, match="seen pool"):
            seen_pool_options(cls, {cls.template_options[0]: "promptsrc60"}, split, seen_file)


def test_a_held_out_wording_as_a_training_template_is_refused(split):
    with pytest.raises(UserError, match="held-out or out-of-family"):
        seen_pool_options(METHODS.get("erm"), {"template": split.held_out[0]}, split, "seen.txt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path, Path]:
    """erm-multi trained under the protocol on colour folders: (result, data folder, run folder)."""
    root = tmp_path_factory.mktemp("wordings")
    folder = write_train_test_folders(root / "colours", train=6, test=3)
    request = TrainRequest(method="erm-multi", learner="coop", model=str(TINY_CONFIG), dataset=f"folder:{folder}",
                           shots=4, output=str(root / "run"), eval_perturb="drop:strong", bootstrap=20,
                           config=TrainConfig(epochs=4, batch_size=4, lr=0.02, warmup_epochs=0, seed=3),
                           method_options={"templates_per_step": 4}, device="cpu", fewshot_cache=None,
                           wordings=WordingProtocol())
    return run_training(request, {}), folder, root / "run"


def test_trained_on_the_seen_pool_and_scored_on_the_others_reports_each(trained):
    doc, _, run_folder = trained
    split = split_wordings(WordingProtocol())
    assert set(doc["subsets"]) == {f"{s}@{p}" for s in ("base", "new") for p in POOLS}
    assert WordingSplit.from_dict(doc["run"]["wordings"]) == split  # the split is recorded in the result
    for pool, templates in split.pools().items():
        body = doc["subsets"][f"base@{pool}"]
        assert len(body["per_template_acc"]) == len(templates) and body["metrics"]["acc_mean"]["ci"] is not None
        assert set(doc["base_new_by_wording"][pool]) == {"base", "new", "H"}
    assert doc["run"]["templates"] == [*split.seen, *split.held_out, *split.out_of_family]
    trained_on = doc["run"]["training"]["method_options"]["templates"]
    assert load_templates(trained_on).templates == split.seen == load_templates(str(run_folder / SEEN_WORDINGS)).templates
    settings = json.loads((run_folder / "train.json").read_text())
    assert settings["request"]["wordings"] == {"pool": "promptsrc60", "held_out": 1 / 3,
                                               "out_of_family": "out_of_family", "seed": 0}
    training = doc["run"]["training"]
    assert training["last_loss"] < training["first_loss"]  # the multi-template control learns


def test_evaluate_scores_a_checkpoint_on_the_split_it_was_trained_under(trained, tmp_path):
    doc, folder, run_folder = trained
    out = tmp_path / "eval.json"
    proc = run_console("evaluate", "--model", str(TINY_CONFIG), "--learner", str(run_folder / "learner.safetensors"),
                       "--dataset", f"folder:{folder}", "--subset", "base", "--wordings", "split",
                       "--wording-seed", "7", "--perturb", "none", "--bootstrap", "0", "--device", "cpu",
                       "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(out.read_text())
    assert set(scored["subsets"]) == {f"base@{p}" for p in POOLS}
    assert scored["run"]["wordings"] == doc["run"]["wordings"]  # the recorded split, not --wording-seed 7's
    for pool in POOLS:  # the same learner on the same images and wordings: the same accuracy
        assert scored["subsets"][f"base@{pool}"]["metrics"]["acc_mean"]["value"] == pytest.approx(
            doc["subsets"][f"base@{pool}"]["metrics"]["acc_mean"]["value"])


def test_cli_wordings_mode_is_checked_in_one_line(tmp_path):
    proc = run_console("train", "--wordings", "splitt", "--output", str(tmp_path / "x"))
    assert_one_line_error(proc, "unknown wordings mode 'splitt'", "split")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("pool", [SEEN, HELD_OUT, OUT_OF_FAMILY])
def test_pool_names_are_the_result_subset_suffixes(pool):
    from promptbench_vlm.wordings import split_subset_name, subset_name

    assert split_subset_name(subset_name("base", pool)) == ("base", pool)
    assert split_subset_name("base") == ("base", None)
