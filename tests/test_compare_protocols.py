"""The cross-dataset and domain-generalisation protocols of `promptbench compare`, end to end on
the toy world's transfer targets (tiny model, tiny budgets), and their statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_console

from promptbench_vlm.compare.grid import check_transfer_targets
from promptbench_vlm.compare.inference import crossed_bootstrap, stratified_bootstrap
from promptbench_vlm.compare.sweep import build_sweep, plan, read_sweep_file
from promptbench_vlm.errors import UserError
from promptbench_vlm.protocols import target_label
from promptbench_vlm.results import read_result

SWEEPS = Path(__file__).parent.parent / "examples" / "sweeps"
TEMPLATES = ("a photo of a {}.", "a {}.", "itap of the {}.", "a bad photo of the {}.", "a drawing of a {}.",
             "a photo of the small {}.")


def tiny_sweep(tmp_path: Path, protocol: str, targets: list[str], wordings: str, seeds: list[int] = [1, 2]) -> Path:
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    path = tmp_path / "sweep.toml"
    path.write_text(f"""
protocol = "{protocol}"
datasets = ["toy-shapes"]
targets = {json.dumps(targets)}
methods = ["zeroshot", "erm"]
learners = ["coop"]
seeds = {seeds}
shots = 1
epochs = 1
batch_size = 16
templates = "{tmp_path / 't.txt'}"
wordings = "{wordings}"
perturb = "drop:strong"
bootstrap = 50
model = "{TINY_CONFIG}"
device = "cpu"
output = "{tmp_path / 'out'}"
reference = "zeroshot"
""")
    return path


@pytest.mark.parametrize("name,protocol,n_targets", [("toy_cross_dataset.toml", "cross-dataset", 2),
                                                     ("toy_dg.toml", "domain-generalization", 4)])
def test_the_shipped_protocol_sweeps_plan_and_their_targets_load(name, protocol, n_targets):
    sweep = build_sweep(read_sweep_file(SWEEPS / name))
    assert sweep.protocol == protocol and len(sweep.targets) == n_targets
    assert sweep.train_subset == "all" and sweep.eval_subset == "all"
    runs, left_out = plan(sweep)
    assert {r.method for r in runs} == set(sweep.methods) and not left_out
    check_transfer_targets(sweep)  # every target loads, and DG targets hold the source's classes


def test_cross_dataset_runs_end_to_end_with_a_table_per_target(tmp_path):
    sweep = tiny_sweep(tmp_path, "cross-dataset", ["toy-colours", "toy-forms"], "all")
    proc = run_console("compare", str(sweep), env={"PROMPTBENCH_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    train = json.loads((out / "toy-shapes" / "erm__coop__seed1" / "train.json").read_text())
    assert train["request"]["subset"] == "all" and train["train_images"] == 48  # 1 shot of every class
    docs = {}
    for cell in ("zeroshot__zeroshot__seed1", "erm__coop__seed1", "erm__coop__seed2"):
        docs[cell] = read_result(out / "toy-shapes" / cell / "result.json")  # validates against the schema
    doc = docs["erm__coop__seed1"]
    assert list(doc["subsets"]) == ["all", "target:toy-colours", "target:toy-forms"] and "base_new" not in doc
    assert [doc["subsets"][s]["n_classes"] for s in doc["subsets"]] == [48, 8, 6]
    assert [doc["subsets"][s]["n_images"] for s in doc["subsets"]] == [960, 480, 360]
    assert doc["run"]["targets"] == ["toy-colours", "toy-forms"] and doc["run"]["subset"] == "all"

    stats = json.loads((out / "statistics.json").read_text())
    erm = next(g for g in stats["groups"] if g["method"] == "erm")
    per_seed = [np.mean([docs[f"erm__coop__seed{s}"]["subsets"][t]["metrics"]["acc_mean"]["value"]
                         for t in ("target:toy-colours", "target:toy-forms")]) for s in (1, 2)]
    average = erm["clean"]["target-average"]["acc_mean"]
    assert average["mean"] == pytest.approx(np.mean(per_seed)) and average["std"] == pytest.approx(np.std(per_seed))
    assert average["ci"][0] < average["mean"] < average["ci"][1] and average["n_seeds"] == 2
    tests = {(c["subset"], c["metric"]): c for c in stats["comparisons"] if c["group"] == "erm/coop"}
    assert {"all", "target:toy-colours", "target:toy-forms", "target-average"} <= {s for s, _ in tests}
    assert tests[("target-average", "acc_mean")]["test"] == "seeds x images, by target"
    assert tests[("target:toy-forms", "drop:strong/AS")]["p_holm"] is not None  # perturbation metrics per target
    assert all(c["p_holm"] >= c["p_value"] for c in tests.values() if c["p_value"] is not None)

    report = (out / "report.md").read_text()
    headline = report.split("## Accuracy and sensitivity")[1].split("##")[0]
    assert "| acc all (%) | acc target:toy-colours (%) | acc target:toy-forms (%) | acc target-average (%) |" in headline
    assert "protocol: cross-dataset" in report and "subset target:toy-forms" in report  # per-target perturbation tables


def test_domain_generalization_runs_end_to_end_under_the_wording_protocol(tmp_path):
    sweep = tiny_sweep(tmp_path, "domain-generalization", ["toy-shapes:hard", "toy-shapes:rendition"], "split", [2])
    proc = run_console("compare", str(sweep), env={"PROMPTBENCH_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read_result(tmp_path / "out" / "toy-shapes" / "erm__coop__seed2" / "result.json")
    assert "target:toy-shapes-hard@held-out" in doc["subsets"] and "all@seen" in doc["subsets"]
    assert doc["subsets"]["target:toy-shapes-rendition@seen"]["n_classes"] == 24
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    erm = next(g for g in stats["groups"] if g["method"] == "erm")
    assert {"target-average@seen", "target-average@held-out", "target-average@out-of-family"} <= set(erm["clean"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| erm | coop | toy-shapes | 2 | target-average | acc |" in report
    tests = {(c["subset"], c["metric"]): c for c in stats["comparisons"] if c["group"] == "erm/coop"}
    assert tests[("target-average@held-out", "acc_mean")]["test"] == "images by target (1 seed)"


def test_a_target_with_other_classes_is_refused_under_domain_generalization(tmp_path):
    sweep = tiny_sweep(tmp_path, "domain-generalization", ["toy-colours"], "all")
    proc = run_console("compare", str(sweep))
    assert_one_line_error(proc, "toy-colours", "cross-dataset")
    assert not (tmp_path / "out").exists()  # refused before any run


def test_protocol_flags_and_their_errors(tmp_path):
    proc = run_console("compare", "--method", "zeroshot", "--protocol", "cross-datset", "--target", "toy-forms",
                       "--output", str(tmp_path / "o"))
    assert_one_line_error(proc, "Did you mean 'cross-dataset'")
    with pytest.raises(UserError, match="needs targets"):
        build_sweep({"methods": ["zeroshot"], "protocol": "domain-generalization"})
    with pytest.raises(UserError, match="need protocol"):
        build_sweep({"methods": ["zeroshot"], "targets": ["toy-forms"]})
    with pytest.raises(UserError, match="same name"):
        build_sweep({"methods": ["zeroshot"], "protocol": "cross-dataset", "targets": ["folder:/a/x", "folder:/b/x"]})
    assert target_label("coop:imagenet_a@/data/coop") == "coop-imagenet_a"
    assert target_label("toy-shapes:sketch") == "toy-shapes-sketch"


def test_the_stratified_bootstrap_weighs_each_target_equally():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(3, 40))
    same, crossed = stratified_bootstrap([one], 300, seed=4), crossed_bootstrap(one, 300, seed=4)
    assert (same.value, *same.ci, same.p_value) == pytest.approx((crossed.value, *crossed.ci, crossed.p_value))
    small, large = np.full((3, 10), 10.0), np.zeros((3, 990))
    both = stratified_bootstrap([small, large], 200, seed=0)
    assert both.value == 5.0 and both.ci == (5.0, 5.0)  # the mean of the two means, not of the 1000 images
    shifted = stratified_bootstrap([one + 1.0, rng.normal(1.0, 1.0, size=(3, 60))], 400, seed=1)
    assert shifted.p_value < 0.05 and shifted.ci[0] > 0


def test_evaluate_and_train_score_targets_with_the_same_evaluation(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES[:3]) + "\n")
    common = ["--model", str(TINY_CONFIG), "--device", "cpu", "--bootstrap", "20"]
    proc = run_console("evaluate", *common, "--templates", str(tmp_path / "t.txt"), "--perturb", "drop:strong",
                       "--target", "toy-forms", "--target", "toy-shapes:hard", "--output", str(tmp_path / "e.json"),
                       "--no-cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = read_result(tmp_path / "e.json")
    assert list(doc["subsets"]) == ["all", "target:toy-forms", "target:toy-shapes-hard"]
    assert doc["run"]["targets"] == ["toy-forms", "toy-shapes:hard"]
    proc = run_console("train", *common, "--subset", "all", "--shots", "1", "--epochs", "1", "--eval-templates",
                       str(tmp_path / "t.txt"), "--eval-perturb", "none", "--target", "toy-colours",
                       "--output", str(tmp_path / "run"), env={"PROMPTBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = read_result(tmp_path / "run" / "result.json")
    assert list(trained["subsets"]) == ["all", "target:toy-colours"]
    assert trained["subsets"]["target:toy-colours"]["n_classes"] == 8
