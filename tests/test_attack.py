"""promptbench attack: class slot protected, budget of encodings kept, a planted weak wording found,
search and report images disjoint, the command end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (COLOURS, TINY_CONFIG, ColourDataset, assert_one_line_error, colour_image, run_console,
                      schema_property_names)
from promptbench_vlm.attack import (ATTACK_SCHEMA_FILE, AttackSettings, attack_schema, grammatical, neighbours,
                                    read_attack, run_attack, stratified_halves, word_distance)
from promptbench_vlm.errors import UserError
from promptbench_vlm.evaluation import EvalRequest
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import load_lexicon
from promptbench_vlm.templates import load_templates

STARTS = ("a photo of a {}.", "a sketch of a {}.", "itap of the {}.")
PLANTED = "snapshot"  # one synonym edit away from "a photo of a {}."


@pytest.fixture
def zeroshot(tiny_backbone):
    return build_learner("zeroshot", tiny_backbone)


class Counting:
    """Counts the images and prompt strings a learner's encoders see (as the evaluator's test does)."""

    def __init__(self, learner):
        self.images, self.texts = 0, []
        enc_i, enc_t = learner.encode_images, learner.encode_texts

        def encode_images(x):
            self.images += x.shape[0]
            return enc_i(x)

        def encode_texts(texts, image_features=None):
            self.texts += list(texts)
            return enc_t(texts)

        learner.encode_images, learner.encode_texts = encode_images, encode_texts


def plant_weak_wording(learner, dataset):
    """Make `learner` near perfect on every wording but those containing `PLANTED`, on which each
    class's text feature is the next class's image prototype (accuracy near 0)."""
    with torch.no_grad():
        images = torch.stack([learner.backbone.preprocess(dataset.load(i)) for i in range(len(dataset))])
        feats = learner.encode_images(images)
    labels = torch.tensor(dataset.labels)
    protos = F.normalize(torch.stack([feats[labels == c].mean(0) for c in range(len(dataset.classnames))]), dim=-1)
    names = dataset.classnames

    def encode_texts(texts, image_features=None):
        rows = []
        for text in texts:
            c = next(i for i, name in enumerate(names) if name in text.split(" ")[-1] or f" {name}" in text)
            rows.append(protos[(c + 1) % len(names)] if PLANTED in text else protos[c])
        return torch.stack(rows)

    learner.encode_texts = encode_texts
    return learner


class RenamedColours(ColourDataset):
    """The colour images under class names that are lexicon keys or start with an article."""

    def __init__(self, per_class: int):
        super().__init__(per_class)
        self.colours, self.classnames = self.classnames, ["photo", "an apple", "bad picture", "itap"]

    def load(self, index: int):
        return colour_image(COLOURS[self.colours[self.labels[index]]], seed=index)


def request(**kw) -> EvalRequest:
    return EvalRequest(model=str(TINY_CONFIG), device="cpu", output=None, cache=False, **kw)


def test_neighbours_keep_the_class_slot_and_stay_on_the_lexicon():
    lexicon = load_lexicon()
    for template in load_templates("promptsrc60").templates:
        before = template.split("{}")
        for text, op, detail, _ in neighbours(template, lexicon):
            assert text.count("{}") == 1 and text != template
            assert op in ("synonym", "context", "determiner", "drop")
            # the words glued to the slot (". " after it, nothing else) are never split off it
            assert text.split("{}")[1].startswith(before[1].split(" ")[0].rstrip(".")), (template, text)
    assert grammatical("an image of a {}.") and not grammatical("a image of a {}.")
    assert word_distance("a photo of a {}.", "a photo of the {}.") == 1
    assert word_distance("a photo of a {}.", "a good photo of {}.") == 2


def test_search_never_edits_the_class_name_and_keeps_the_budget(zeroshot):
    dataset = RenamedColours(per_class=4)
    counter = Counting(zeroshot)
    budget = 14
    attack = run_attack(request(), AttackSettings(budget=budget, beam=2, max_edits=2), learner=zeroshot,
                        dataset=dataset, templates=STARTS)
    assert counter.images == len(dataset)  # every image once, the two halves share one encoding
    assert len(counter.texts) == len(set(counter.texts)) <= budget * len(dataset.classnames)
    assert attack.doc["counts"]["texts_encoded"] == len(counter.texts)
    scored = attack.doc["scored_templates"]
    assert set(STARTS) <= set(scored) and all(t.count("{}") == 1 for t in scored)
    # every string encoded is a scored wording filled with a class name, verbatim
    assert set(counter.texts) <= {t.replace("{}", c) for t in scored for c in dataset.classnames}
    assert attack.doc["summary"]["wordings_scored"] == budget


def test_search_finds_a_planted_weak_wording_within_a_small_budget(zeroshot):
    dataset = ColourDataset(per_class=6)
    learner = plant_weak_wording(zeroshot, dataset)
    lexicon = load_lexicon()
    one_edit = sum(len(neighbours(t, lexicon)) for t in STARTS)
    attack = run_attack(request(), AttackSettings(budget=len(STARTS) + one_edit, beam=len(STARTS)),
                        learner=learner, dataset=dataset, templates=STARTS)
    summary = attack.doc["summary"]
    assert PLANTED in summary["worst_template"]
    assert summary["mean_acc"] > 0.9 and summary["worst_case_acc"] < 0.1
    assert summary["gap"] > 0.8
    per_image = attack.doc["report_per_image"]  # the summary follows from the per-image record
    assert np.mean(per_image["worst_correct"]) == pytest.approx(summary["worst_case_acc"])
    assert np.mean(per_image["starts_correct"]) / per_image["n_starts"] == pytest.approx(summary["mean_acc"])
    low, high = summary["gap_ci"]
    assert low <= summary["gap"] <= high and low > 0.5
    worst = attack.doc["worst"][0]
    assert worst["start"] == "a photo of a {}." and [e["op"] for e in worst["path"]] == ["synonym"]
    curve = [p["worst_search_acc"] for p in attack.doc["curve"]]
    assert curve == sorted(curve, reverse=True) and curve[0] > 0.9 and curve[-1] < 0.1


def test_search_and_report_images_are_disjoint():
    labels = [c for c in range(4) for _ in range(5)]
    search, report = stratified_halves(labels, seed=3)
    assert not set(search) & set(report) and sorted(search + report) == list(range(len(labels)))
    assert {labels[i] for i in search} == {labels[i] for i in report} == set(range(4))
    assert stratified_halves(labels, seed=3) == (search, report) != stratified_halves(labels, seed=4)


def test_attack_command_writes_the_result(image_folder, tmp_path):
    templates = tmp_path / "starts.txt"
    templates.write_text("a photo of a {}.\nitap of the {}.\n", encoding="utf-8")
    out = tmp_path / "attack.json"
    proc = run_console("attack", "--model", str(TINY_CONFIG), "--dataset", f"folder:{image_folder}",
                       "--templates", str(templates), "--budget", "6", "--beam", "2", "--device", "cpu",
                       "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["schema"] == "promptbench_vlm/attack" and doc["summary"]["wordings_scored"] == 6
    assert doc["splits"]["search_images"] + doc["splits"]["report_images"] == 12
    assert doc["counts"]["texts_encoded"] <= 6 * 4 and "worst-case accuracy" in proc.stdout
    again = run_console("attack", "--model", str(TINY_CONFIG), "--dataset", f"folder:{image_folder}",
                        "--templates", str(templates), "--budget", "6", "--beam", "2", "--device", "cpu",
                        "--output", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-2000:]
    counts = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))["counts"]
    assert counts["images_encoded"] == counts["texts_encoded"] == 0  # all from the evaluator's feature cache
    assert counts["texts_cached"] == doc["counts"]["texts_encoded"]
    bad = run_console("attack", "--model", str(TINY_CONFIG), "--dataset", f"folder:{image_folder}",
                      "--templates", str(templates), "--budget", "1", "--device", "cpu", "--output", str(out))
    assert_one_line_error(bad, "--budget 1", "start templates")


@pytest.mark.parametrize("req, settings, needle", [
    ({"subset": "base-new"}, {}, "one subset"),
    ({}, {"search_split": "test"}, "must differ"),
    ({}, {"budget": 10}, "start templates"),
])
def test_bad_attack_requests_fail_before_any_model_loads(req, settings, needle, monkeypatch):
    import promptbench_vlm.attack as attack

    monkeypatch.setattr(attack, "load_evaluated_learner", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=needle):
        run_attack(request(**req), AttackSettings(**settings))
    with pytest.raises(UserError, match="did you mean|Valid"):
        AttackSettings(objective="acc")


DOCS = Path(__file__).parent.parent / "docs"


@pytest.mark.parametrize("settings, bootstrap", [({}, 20), ({"objective": "sensitivity", "max_edits": 1}, 0)])
def test_attack_results_validate_against_the_shipped_schema(zeroshot, tmp_path, settings, bootstrap):
    jsonschema.Draft202012Validator.check_schema(attack_schema())
    attack = run_attack(replace(request(bootstrap=bootstrap), output=str(tmp_path / "a.json")),
                        AttackSettings(budget=6, beam=2, **settings), learner=zeroshot,
                        dataset=ColourDataset(per_class=4), templates=STARTS)
    doc = read_attack(attack.path)  # checked against the schema on reading
    assert doc == json.loads(json.dumps(attack.doc))
    assert (doc["summary"]["gap_ci"] is None) == (bootstrap == 0)
    doc["summary"]["worst_case_acc"] = 1.5
    del doc["counts"]["texts_encoded"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"not a valid attack result at /counts: 'texts_encoded' is a required "
                                        r"property \(and 1 more\)"):
        read_attack(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "promptbench_vlm/result"}))
    with pytest.raises(UserError, match="not a promptbench_vlm attack result"):
        read_attack(tmp_path / "other.json")


def test_docs_describe_every_field_of_the_attack_schema():
    attack_doc = (DOCS / "attack.md").read_text(encoding="utf-8")
    text = attack_doc + (DOCS / "results.md").read_text(encoding="utf-8")  # the shared run block is described there
    assert f"`{ATTACK_SCHEMA_FILE.name}`" in attack_doc and "attack.schema.json" in (DOCS / "results.md").read_text()
    names = schema_property_names(attack_schema())
    assert not sorted(n for n in names if f"`{n}`" not in text), "docs/attack.md does not describe them"
    run_only = set(attack_schema()["$defs"]["run"]["properties"]) - {"attack"}
    assert not sorted(n for n in names - run_only if f"`{n}`" not in attack_doc)



def test_a_learner_is_refused_by_its_capability_not_its_name(zeroshot):
    class Conditional(type(zeroshot)):  # any learner whose text features depend on the image
        name = "my-plugin"
        conditional = True

    zeroshot.__class__ = Conditional
    with pytest.raises(UserError, match="'my-plugin' cannot be attacked: it lacks the capability 'unconditional'"):
        run_attack(request(), AttackSettings(budget=4), learner=zeroshot, dataset=ColourDataset(per_class=2),
                   templates=STARTS)
