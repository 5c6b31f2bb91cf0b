"""Worst-case accuracy in `compare`: a sweep run without an attack, rerun with one and
--skip-existing, keeps every trained cell and only adds the attacks; attacks that fit are reused,
stale ones rerun and named; the report's worst-case cells and paired tests follow from the attack
files; image-conditional learners are refused through their capability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_cli, run_console, write_train_test_folders

from promptbench_vlm.attack import read_attack
from promptbench_vlm.compare.inference import holm
from promptbench_vlm.compare.sweep import build_sweep
from promptbench_vlm.errors import UserError
from promptbench_vlm.files import sha256_file

TEMPLATES = ("a photo of a {}.", "itap of the {}.", "a bad photo of the {}.")
ATTACK = "attack = { budget = 8, beam = 2, max_edits = 2 }"


def sweep_file(tmp_path: Path, data: Path, extra: str = "") -> Path:
    """A two-seed zeroshot + erm/coop sweep on the tiny model, as TOML (JSON scalars and lists are
    TOML too), with `extra` lines (the attack table) added."""
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    values = {"methods": ["zeroshot", "erm"], "learners": ["coop"], "datasets": [f"folder:{data}"], "seeds": [1, 2],
              "shots": 2, "epochs": 1, "batch_size": 4, "lr": 0.02, "templates": str(tmp_path / "t.txt"),
              "perturb": "drop:strong", "bootstrap": 50, "model": str(TINY_CONFIG), "device": "cpu",
              "output": str(tmp_path / "out")}
    path = tmp_path / f"sweep{len(list(tmp_path.glob('sweep*.toml')))}.toml"
    path.write_text("\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + f"\n{extra}\n")
    return path


def runs(tmp_path: Path) -> dict[tuple[str, int], dict]:
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    return {(r["method"], r["seed"]): r for r in summary["runs"]}


def stamps(folder: Path, pattern: str) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(folder.rglob(pattern))}


def test_a_rerun_with_the_attack_key_reuses_the_cells_and_adds_only_the_attacks(monkeypatch, capsys, tmp_path):
    data = write_train_test_folders(tmp_path / "data", train=4, test=6)
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(sweep_file(tmp_path, data)))
    assert code == 0, err
    out = tmp_path / "out"
    trained = {**stamps(out, "learner.safetensors"), **stamps(out, "result.json"), **stamps(out, "train.json")}
    assert "Worst-case" not in (out / "report.md").read_text()

    code, _, err = run_cli(monkeypatch, capsys, "compare", str(sweep_file(tmp_path, data, ATTACK)), "--skip-existing",
                           "--plot")
    assert code == 0, err
    assert {(r["status"], r["attack"]) for r in runs(tmp_path).values()} == {("existing", "done")}
    assert (out / "plots" / "worst_case_vs_budget.png").stat().st_size > 10_000
    assert {**stamps(out, "learner.safetensors"), **stamps(out, "result.json"), **stamps(out, "train.json")} == trained
    cells = {key: Path(r["folder"]) for key, r in runs(tmp_path).items()}
    docs = {(key, subset): read_attack(folder / f"attack-{subset}.json")  # valid against the shipped schema
            for key, folder in cells.items() for subset in ("base", "new")}
    for ((method, _), _), doc in docs.items():
        assert doc["run"]["attack"]["budget"] == 8 and doc["summary"]["wordings_scored"] == 8
        if method == "erm":  # the attack scored the cell's own checkpoint
            assert doc["run"]["checkpoint_sha256"] == sha256_file(Path(doc["run"]["checkpoint"]))
            assert Path(doc["run"]["checkpoint"]).parent in cells.values()
    # one memory cache for the sweep: the zero-shot learner's second seed encodes nothing, and the
    # CoOp cells (image side not learned) share their images
    for subset in ("base", "new"):
        assert docs[(("zeroshot", 2), subset)]["counts"]["texts_encoded"] == 0
        assert docs[(("zeroshot", 2), subset)]["counts"]["images_encoded"] == 0
        assert docs[(("erm", 2), subset)]["counts"]["images_encoded"] == 0
        assert docs[(("erm", 2), subset)]["counts"]["texts_encoded"] > 0  # its own learned context
    report = (out / "report.md").read_text()
    table = report.split("## Worst-case accuracy")[1].split("##")[0]
    assert "budget 8 wordings" in table and len([r for r in table.splitlines() if r.startswith("| zeroshot")]) == 4
    assert "| 3 wordings |" in table and "| 8 wordings |" in table  # the budget-curve table beside it
    assert "attack (worst-case accuracy): 4 done" in report

    # the worst-case numbers follow from the attack files, with the statistics of every other column
    stats = json.loads((out / "statistics.json").read_text())
    groups = {g["method"]: g for g in stats["groups"]}
    for method in ("zeroshot", "erm"):
        for subset in ("base", "new"):
            worst = [100 * docs[((method, s), subset)]["summary"]["worst_case_acc"] for s in (1, 2)]
            cell = groups[method]["worst_case"][subset]["worst_acc"]
            assert cell["mean"] == pytest.approx(np.mean(worst)) and cell["std"] == pytest.approx(np.std(worst))
            assert cell["n_seeds"] == 2 and cell["ci"][0] <= cell["mean"] <= cell["ci"][1]
            curve = groups[method]["worst_case_curve"][subset]  # the budget curve ends at the search's pick
            assert curve["wordings"][0] == len(TEMPLATES) and curve["wordings"][-1] == 8
            assert curve["mean"][-1] == pytest.approx(np.mean(worst))
    tests = [c for c in stats["comparisons"] if c["metric"] == "worst_acc"]
    assert {(c["group"], c["reference"], c["subset"]) for c in tests} == {("erm/coop", "zeroshot", "base"),
                                                                           ("erm/coop", "zeroshot", "new")}
    for c in tests:
        per_seed = [100 * (docs[(("erm", s), c["subset"])]["summary"]["worst_case_acc"]
                           - docs[(("zeroshot", s), c["subset"])]["summary"]["worst_case_acc"]) for s in (1, 2)]
        assert c["test"] == "seeds x images" and c["seed_test"]["per_seed"] == pytest.approx(per_seed)
        assert c["diff"] == pytest.approx(np.mean(per_seed)) and c["p_holm"] >= c["p_value"]
    family = [c for c in stats["comparisons"] if c["group"] == "erm/coop" and c["p_value"] is not None
              and c["holm_family"] == "headline"]  # worst-case tests join accuracy and S(θ) in Holm's family
    assert {c["metric"] for c in family} == {"acc_mean", "sensitivity", "worst_acc"}
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p_value"] for c in family]))

    # a second rerun reuses the attacks as they are
    attacks = stamps(out, "attack-*.json")
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(sweep_file(tmp_path, data, ATTACK)), "--skip-existing")
    assert code == 0, err
    assert {r["attack"] for r in runs(tmp_path).values()} == {"existing"} and stamps(out, "attack-*.json") == attacks

    # stale attacks are rerun and named: another checkpoint (its hash), other settings
    tampered = cells[("erm", 1)] / "attack-base.json"
    doc = json.loads(tampered.read_text())
    doc["run"]["checkpoint_sha256"] = "0" * 64
    tampered.write_text(json.dumps(doc))
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(sweep_file(tmp_path, data, ATTACK)), "--skip-existing")
    assert code == 0, err
    assert "rerunning the attack of erm/coop" in err and "checkpoint_sha256" in err
    assert {k: r["attack"] for k, r in runs(tmp_path).items()}[("erm", 1)] == "done"
    assert read_attack(tampered)["run"]["checkpoint_sha256"] == sha256_file(cells[("erm", 1)] / "learner.safetensors")
    other = sweep_file(tmp_path, data, ATTACK.replace("budget = 8", "budget = 7"))
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(other), "--report-only")
    assert code == 0, err  # nothing runs: the attacks on disk do not fit, so no worst-case column
    assert {r["attack"].split(":")[0] for r in runs(tmp_path).values()} == {"mismatched"}
    assert "## Worst-case accuracy" not in (out / "report.md").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(other), "--skip-existing")
    assert code == 0, err
    assert err.count("rerunning the attack") == 4 and "recorded attack.budget differ" in err
    assert {(r["status"], r["attack"]) for r in runs(tmp_path).values()} == {("existing", "done")}

    # a file this package did not write is left alone
    foreign = cells[("zeroshot", 1)] / "attack-new.json"
    foreign.write_text("my notes\n")
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(other), "--skip-existing")
    assert code == 0, err
    assert runs(tmp_path)[("zeroshot", 1)]["attack"].startswith("failed:") and "left alone" in err
    assert foreign.read_text() == "my notes\n"


def test_image_conditional_learners_are_refused_through_their_capability(monkeypatch, capsys, tmp_path):
    data = write_train_test_folders(tmp_path / "data", train=2, test=2)
    proc = run_console("attack", "--model", str(TINY_CONFIG), "--dataset", f"folder:{data}", "--learner", "cocoop",
                       "--budget", "4", "--device", "cpu", "--output", str(tmp_path / "a.json"))
    assert_one_line_error(proc, "learner 'cocoop' cannot be attacked", "capability 'unconditional'")
    assert not (tmp_path / "a.json").exists()
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--method", "erm", "--learner", "cocoop", "--seed", "1",
                           "--dataset", f"folder:{data}", "--model", str(TINY_CONFIG), "--device", "cpu",
                           "--shots", "1", "--epochs", "1", "--templates", "single", "--wordings", "all", "--perturb", "none",
                           "--bootstrap", "0", "--attack-budget", "4", "--output", str(tmp_path / "out"))
    assert code == 0, err
    record = runs(tmp_path)[("erm", 1)]
    assert record["status"] == "done" and record["attack"].startswith("not applicable: learner 'cocoop'")
    assert not list((tmp_path / "out").rglob("attack-*.json"))


def test_the_attack_key_is_checked_before_anything_runs():
    sweep = build_sweep({"methods": ["zeroshot"], "attack": {"budget": 50, "objective": "loss"}})
    assert sweep.attack.budget == 50 and sweep.attack.objective == "loss" and sweep.attack.beam == 8
    assert build_sweep({"methods": ["zeroshot"]}).attack is None
    for table, needle in [({"budgt": 5}, "Did you mean 'budget'"), ({"budget": "5"}, "'attack.budget' must be int"),
                          ({"budget": 0}, "at least 1"), ({"objective": "acc"}, "accuracy"),
                          (5, "must be a table")]:
        with pytest.raises(UserError, match=needle):
            build_sweep({"methods": ["zeroshot"], "attack": table})
