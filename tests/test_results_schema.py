"""The result file's schema: what evaluate, train and compare write validates against the shipped
JSON Schema and carries the same run fields; report renders each; version-1 files still read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from conftest import (TINY_CONFIG, assert_one_line_error, run_cli, run_console, schema_property_names,
                      write_train_test_folders)
from rich.console import Console

from promptbench_vlm.compare.stats import Group, summarise
from promptbench_vlm.errors import UserError
from promptbench_vlm.report import render
from promptbench_vlm.results import SCHEMA_FILE, SCHEMA_VERSION, read_result, result_schema

V1_FILES = sorted((Path(__file__).parent / "data" / "results-v1").glob("*.json"))
DOCS = Path(__file__).parent.parent / "docs" / "results.md"
COMMON = ["--model", str(TINY_CONFIG), "--device", "cpu", "--bootstrap", "20"]


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict[str, dict]:
    """The result documents of one CoOp run trained by `train`, the same checkpoint scored by
    `evaluate`, and `compare`'s zero-shot and ERM-trained CoOp runs, on the same images."""
    root = tmp_path_factory.mktemp("producers")
    data = write_train_test_folders(root / "data", train=3, test=3)
    mp = pytest.MonkeyPatch()
    capsys = _NoCapture()
    shared = [*COMMON, "--dataset", f"folder:{data}"]
    code, _, err = run_cli(mp, capsys, "train", *shared, "--learner", "coop", "--epochs", "1", "--shots", "2",
                           "--batch-size", "4", "--eval-templates", "single", "--eval-perturb", "drop:weak",
                           "--output", str(root / "run"))
    assert code == 0, err
    code, _, err = run_cli(mp, capsys, "evaluate", *shared, "--learner", str(root / "run" / "learner.safetensors"),
                           "--subset", "base-new", "--templates", "single", "--perturb", "drop:weak", "--no-cache", "--seed", "1",
                           "--output", str(root / "evaluate.json"))
    assert code == 0, err
    code, _, err = run_cli(mp, capsys, "compare", *shared, "--method", "zeroshot", "--method", "erm",
                           "--learner", "coop", "--seed", "1", "--shots", "2", "--epochs", "1", "--batch-size", "4",
                           "--templates", "single", "--perturb", "drop:weak", "--wordings", "all",
                           "--output", str(root / "cmp"))
    assert code == 0, err
    code, _, err = run_cli(mp, capsys, "compare", *shared, "--method", "zeroshot", "--seed", "1",
                           "--templates", "promptsrc60", "--perturb", "drop:weak", "--wordings", "split",
                           "--output", str(root / "wordings"))
    assert code == 0, err
    mp.undo()
    runs = {p.parent.name: p for p in (root / "cmp").rglob("result.json")}
    return {"train": read_result(root / "run" / "result.json"), "evaluate": read_result(root / "evaluate.json"),
            "compare-zeroshot": read_result(runs["zeroshot__zeroshot__seed1"]),
            "compare-erm": read_result(runs["erm__coop__seed1"]),
            "compare-wordings": read_result(next((root / "wordings").rglob("result.json")))}


class _NoCapture:
    """`run_cli` wants a capsys; a module fixture has none, so output goes to the terminal log."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


@pytest.mark.parametrize("producer", ["train", "evaluate", "compare-zeroshot", "compare-erm", "compare-wordings"])
def test_every_producer_validates_against_the_shipped_schema_and_renders(produced, producer):
    doc = produced[producer]
    assert doc["schema_version"] == SCHEMA_VERSION == 2
    jsonschema.Draft202012Validator.check_schema(result_schema())
    jsonschema.validate(doc, result_schema(), cls=jsonschema.Draft202012Validator)
    out = Console(record=True, width=120)
    render(doc, console=out)
    text = out.export_text()
    assert "accuracy, mean over templates" in text and "drop:weak" in text and "H " in text
    assert ("held-out wordings:" in text) == (producer == "compare-wordings")


def test_all_producers_carry_the_same_run_fields(produced):
    fields = {name: set(doc["run"]) - {"training"} for name, doc in produced.items()}
    assert len({frozenset(f) for f in fields.values()}) == 1, fields
    for name, doc in produced.items():
        run = doc["run"]
        assert run["dataset_fingerprint"] and run["started"] and run["wall_time_s"] > 0, name
        assert run["lexicon"] == "shipped" and run["mask_token"] == "[MASK]" and run["precision"] == "cpu-float32"
        assert ("training" in run) == (name in ("train", "compare-erm")), name
        assert (run["wordings"] is None) == (name != "compare-wordings"), name
    trained, scored = produced["train"]["run"], produced["evaluate"]["run"]
    # the checkpoint evaluated is the one trained, and both say so by its hash
    assert re.fullmatch(r"[0-9a-f]{64}", trained["checkpoint_sha256"])
    assert trained["checkpoint_sha256"] == scored["checkpoint_sha256"]
    assert produced["train"]["subsets"]["new"]["metrics"] == produced["evaluate"]["subsets"]["new"]["metrics"]


@pytest.mark.parametrize("path", V1_FILES, ids=[p.stem for p in V1_FILES])
def test_version_1_files_still_read_render_and_summarise(path, tmp_path):
    assert json.loads(path.read_text())["schema_version"] == 1
    doc = read_result(path)
    assert doc["schema_version"] == 1 and "started" in doc["run"] and "precision" in doc["run"]
    out = Console(record=True, width=120)
    render(doc, console=out)
    assert "base" in out.export_text()
    run = doc["run"]
    summary = summarise(Group(run.get("training", {}).get("method", run["learner"]), run["learner"], run["dataset"],
                              {run["seed"]: doc}), n_resamples=20)
    assert summary.subsets == ["base", "new"] and summary.base_new["H"].mean == pytest.approx(doc["base_new"]["H"])
    proc = run_console("report", str(path), "--csv", str(tmp_path / "r.csv"), cwd=tmp_path)
    assert proc.returncode == 0 and "worst and best templates" in proc.stdout, proc.stderr
    assert (tmp_path / "r.csv").read_text().startswith("subset,group,metric")


def test_a_file_that_departs_from_the_schema_is_one_line(produced, tmp_path):
    doc = json.loads(json.dumps(produced["evaluate"]))
    del doc["run"]["seed"]
    doc["subsets"]["base"]["n_images"] = "six"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"not a valid result file .* at /run: 'seed' is a required property.*1 more"):
        read_result(path)
    assert_one_line_error(run_console("report", str(path), cwd=tmp_path), "bad.json", "/run")
    doc["schema_version"] = 3
    path.write_text(json.dumps(doc))
    assert_one_line_error(run_console("report", str(path), cwd=tmp_path), "schema version 3", "reads 1 and 2")


def test_docs_describe_every_field_of_the_schema():
    text = DOCS.read_text(encoding="utf-8")
    assert f"`{SCHEMA_FILE.name}`" in text
    missing = sorted(name for name in schema_property_names(result_schema()) if f"`{name}`" not in text)
    assert not missing, f"docs/results.md does not describe {missing}"

