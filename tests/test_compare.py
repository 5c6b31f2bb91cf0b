"""`promptbench compare`: sweep parsing, the grid (resume, failures), statistics, paired tests,
tables and plots, on the tiny model and generated colour images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, ColourDataset, run_cli, write_train_test_folders

from promptbench_vlm.compare.plots import all_plots
from promptbench_vlm.compare.stats import Group, compare_to_reference, per_image_values, summarise
from promptbench_vlm.compare.sweep import build_sweep, plan, read_sweep_file
from promptbench_vlm.errors import UserError
from promptbench_vlm.evaluation import EvalRequest, load_inputs, run_evaluation
from promptbench_vlm.learners import build_learner
from promptbench_vlm.results import read_result, write_json

EXAMPLE = Path(__file__).parent.parent / "examples" / "sweeps" / "toy.toml"
LADDER = EXAMPLE.with_name("promise_ladder.toml")
TEMPLATES = ("a photo of a {}.", "a {}.", "itap of the {}.", "a bad photo of the {}.")


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """train/ and test/ folders of the 4 colour classes."""
    return write_train_test_folders(tmp_path_factory.mktemp("colours"), train=4, test=6)


@pytest.fixture(scope="module")
def learner_docs(tiny_backbone, tmp_path_factory) -> dict[str, dict]:
    """Result documents of a CoOp learner, of the same learner again, and of a copy with noise
    added to its context, on the same 32 images."""
    templates = tmp_path_factory.mktemp("templates") / "four.txt"
    templates.write_text("\n".join(TEMPLATES))
    request = EvalRequest(learner="coop", dataset="colours", templates=str(templates), perturb="drop:strong,synonym",
                          bootstrap=200, cache=False, output=None)
    inputs = load_inputs(request, ColourDataset(per_class=8))
    torch.manual_seed(0)
    learner = build_learner("coop", tiny_backbone)
    docs = {"coop": run_evaluation(request, learner=learner, inputs=inputs).doc,
            "again": run_evaluation(request, learner=learner, inputs=inputs).doc}
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx) * 50 * learner.ctx.std())
    docs["noisy"] = run_evaluation(request, learner=learner, inputs=inputs).doc
    return docs


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the sweep ---------------------------------------------------------------------------------

def test_example_sweep_parses_and_plans_every_method(tmp_path):
    sweep = build_sweep(read_sweep_file(EXAMPLE))
    runs, left_out = plan(sweep)
    assert {r.method for r in runs} == set(sweep.methods)
    assert sweep.reference_name() == "erm-multi" and sweep.wording_protocol() is not None
    for method in sweep.methods:  # every trained method runs on each seed of some learner
        assert {r.seed for r in runs if r.method == method} == set(sweep.seeds)
    assert all(f"{r.method}/{r.learner}" not in left_out for r in runs)


def test_the_mmrl_sweep_reuses_the_ladders_maple_runs():
    """mmrl_toy.toml writes into the ladder's folder with the ladder's settings, so --skip-existing
    reuses the MaPLe cells both sweeps plan (their train requests are equal) and trains only MMRL's."""
    from promptbench_vlm.compare.grid import run_folder, train_request

    ladder, mmrl = (build_sweep(read_sweep_file(p)) for p in (LADDER, EXAMPLE.with_name("mmrl_toy.toml")))
    ladder_runs = {(r.method, r.learner, r.seed): r for r in plan(ladder)[0]}
    shared = [r for r in plan(mmrl)[0] if (r.method, r.learner, r.seed) in ladder_runs]
    assert {(r.method, r.learner) for r in shared} == {("erm", "maple"), ("erm-multi", "maple"), ("promise", "maple")}
    for run in shared:
        twin = ladder_runs[(run.method, run.learner, run.seed)]
        assert run_folder(mmrl, run) == run_folder(ladder, twin)
        assert train_request(mmrl, run, run_folder(mmrl, run)) == train_request(ladder, twin, run_folder(ladder, twin))


def test_the_promise_ladder_runs_each_rung_as_promise_against_the_multi_template_control():
    sweep = build_sweep(read_sweep_file(LADDER))
    runs, left_out = plan(sweep)
    rungs = ["promise-plain", "promise-weighting", "promise-token-rates", "promise"]
    assert sweep.methods == ["zeroshot", "erm", "erm-multi", *rungs] and not left_out
    assert [sweep.registered(m) for m in rungs] == ["promise"] * 4 and sweep.registered("erm-multi") == "erm-multi"
    options = [sweep.settings(m).options for m in rungs]
    assert [(o.get("weighting", True), o.get("token_lr", True), o.get("anchor", 1.0)) for o in options] == [
        (False, False, 0.0), (True, False, 0.0), (True, True, 0.0), (True, True, 1.0)]  # one part added per rung
    assert sweep.reference_name() == "erm-multi" and sweep.wordings == "split"
    assert {r.method for r in runs} == set(sweep.methods) and {r.seed for r in runs} == {1, 2, 3}
    assert build_sweep({"methods": ["erm"], "wordings": "all"}).wording_protocol() is None  # the old layout
    # without a reference given, the multi-template control is the default one
    assert build_sweep({"methods": ["zeroshot", "erm", "erm-multi"]}).reference_name() == "erm-multi"


def test_sweep_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="Valid: .*erm.*promise"):
        build_sweep({"methods": ["erm", "promis"]})
    with pytest.raises(UserError, match="unknown learner 'copo'.*Did you mean 'coop'"):
        build_sweep({"methods": ["erm"], "learners": ["copo"]})
    with pytest.raises(UserError, match="unknown sweep key 'seed'.*Did you mean 'seeds'"):
        build_sweep({"methods": ["erm"], "seed": [1]})
    with pytest.raises(UserError, match="'epochs' must be int"):
        build_sweep({"methods": ["erm"], "epochs": "5"})
    with pytest.raises(UserError, match="unknown method 'promis'"):
        build_sweep({"methods": ["plain"], "method": {"plain": {"method": "promis"}}})
    with pytest.raises(UserError, match="unknown wordings mode 'split2'"):
        build_sweep({"methods": ["erm"], "wordings": "split2"})
    with pytest.raises(UserError, match="not in 'methods'"):
        build_sweep({"methods": ["erm"], "method": {"promise": {"epochs": 2}}})
    with pytest.raises(UserError, match=r"fits none of the learners \['coop'\] \(coop lacks image_side_learned\)"):
        plan(build_sweep({"methods": ["promptsrc"], "learners": ["coop"]}))
    with pytest.raises(UserError, match="unknown method 'promise' option 'wieghting'.*Did you mean 'weighting'"):
        build_sweep({"methods": ["promise"], "method": {"promise": {"options": {"wieghting": False}}}})
    typed = build_sweep({"methods": ["promise"], "method": {"promise": {"options": {"weighting": "no"}}}})
    assert typed.settings("promise").options == {"weighting": False}
    with pytest.raises(UserError, match="not valid TOML"):
        read_sweep_file(write_sweep(tmp_path / "bad.toml", "methods = [erm"))
    with pytest.raises(UserError, match="not found"):
        read_sweep_file(tmp_path / "missing.toml")


# --- per-image values and statistics ----------------------------------------------------------

def test_result_files_carry_per_image_values_that_reproduce_the_metrics(learner_docs, tmp_path):
    doc = read_result(write_json(learner_docs["coop"], tmp_path / "r.json"))
    labels, values = per_image_values(doc, "all")
    body = doc["subsets"]["all"]
    assert labels.shape == (32,)
    assert values["acc_mean"].mean() == pytest.approx(body["metrics"]["acc_mean"]["value"])
    assert values["sensitivity"].mean() == pytest.approx(body["metrics"]["sensitivity"]["value"], abs=1e-7)
    for pert in body["perturbations"]:
        for metric in ("acc_pert", "AS", "LPR", "JSD"):
            assert values[f"{pert['label']}/{metric}"].mean() == pytest.approx(pert["metrics"][metric]["value"],
                                                                               abs=1e-7)
    old = json.loads(json.dumps(doc))
    del old["subsets"]["all"]["per_image"]  # a file written before per-image values existed
    assert per_image_values(old, "all") is None
    assert summarise(Group("coop", "coop", "colours", {1: old})).clean["all"]["acc_mean"].ci is not None


def test_learner_against_itself_differs_in_nothing_and_against_a_noisy_copy_significantly(learner_docs):
    summaries = [summarise(Group(name, "coop", "colours", {1: doc}), 200) for name, doc in learner_docs.items()]
    tests = compare_to_reference(summaries, "coop", n_resamples=500)
    itself = [t for t in tests if t.group == "again/coop"]
    noisy = {t.metric: t for t in tests if t.group == "noisy/coop"}
    assert len(itself) == 2 + 2 * 2 and all(t.diff == 0 and not t.significant and t.p_value == 1 for t in itself)
    assert noisy["sensitivity"].significant and noisy["sensitivity"].ci[0] > 0
    assert noisy["sensitivity"].p_value < 0.05


def test_seeds_are_averaged_with_std_and_an_interval(learner_docs):
    a, b = learner_docs["coop"], learner_docs["noisy"]
    summary = summarise(Group("erm", "coop", "colours", {1: a, 2: b}), 200)
    cell = summary.clean["all"]["acc_mean"]
    values = [d["subsets"]["all"]["metrics"]["acc_mean"]["value"] for d in (a, b)]
    assert cell.mean == pytest.approx(np.mean(values)) and cell.std == pytest.approx(np.std(values))
    assert cell.n_seeds == 2 and cell.ci[0] <= cell.mean <= cell.ci[1]
    assert set(summary.perturbations["all"]) == {"drop:strong", "synonym:weak"}


# --- plots -------------------------------------------------------------------------------------

def _ink(path: Path) -> float:
    """Share of pixels that are not background white: a blank figure has almost none."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return float(np.mean(pixels < 200))


def test_plots_exist_are_not_blank_and_follow_the_data(learner_docs, tmp_path):
    summaries = [summarise(Group(n, "coop", "colours", {1: d}), 100) for n, d in learner_docs.items()]
    first = all_plots(summaries, tmp_path / "a")
    assert [p.name for p in first] == ["accuracy_per_template.png", "sensitivity_vs_accuracy.png",
                                       "accuracy_shift.png"]
    for path in first:
        assert path.stat().st_size > 10_000 and _ink(path) > 0.01, path
    changed = json.loads(json.dumps(learner_docs["noisy"]))
    body = changed["subsets"]["all"]
    body["per_template_acc"] = [100.0 - a for a in body["per_template_acc"]]
    for estimate, shift in ([body["metrics"]["acc_mean"], 30], [body["metrics"]["sensitivity"], 0.01],
                            *([p["metrics"]["AS"], 20] for p in body["perturbations"])):
        estimate["value"] += shift
        estimate["ci"] = [c + shift for c in estimate["ci"]]
    summaries[-1] = summarise(Group("noisy", "coop", "colours", {1: changed}), 100)
    second = all_plots(summaries, tmp_path / "b")
    for a, b in zip(first, second):
        assert a.read_bytes() != b.read_bytes(), a.name


# --- the command ------------------------------------------------------------------------------

def test_compare_runs_the_grid_reports_failures_and_resumes(monkeypatch, capsys, split_folder, tmp_path):
    sweep = write_sweep(tmp_path / "s.toml", f"""
methods = ["zeroshot", "erm", "maml-clip"]
learners = ["coop"]
datasets = ["folder:{split_folder}"]
seeds = [1, 2]
shots = 2
epochs = 1
batch_size = 4
lr = 0.02
templates = "{tmp_path / 't.txt'}"
perturb = "drop:strong"
bootstrap = 50
model = "{TINY_CONFIG}"
device = "cpu"
output = "{tmp_path / 'out'}"

[method.maml-clip]
options = {{ inner_steps = 0 }}
""")
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    monkeypatch.setenv("PROMPTBENCH_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(monkeypatch, capsys, "compare", str(sweep), "--plot")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {(r["method"], r["seed"]): r["status"] for r in summary["runs"]}
    assert status == {("zeroshot", 1): "done", ("zeroshot", 2): "done", ("erm", 1): "done", ("erm", 2): "done",
                      ("maml-clip", 1): "failed", ("maml-clip", 2): "failed"}
    assert all("inner_steps" in r["error"] for r in summary["runs"] if r["status"] == "failed")
    assert "failed" in err and "erm" in out and "zeroshot" in out
    report = (tmp_path / "out" / "report.md").read_text()
    headline = report.split("## Accuracy and sensitivity")[1].split("##")[0]
    assert "| classes | metric | seen | held-out | out-of-family |" in headline  # the wording protocol's default
    rows = [line for line in headline.splitlines() if line.startswith(("| zeroshot |", "| erm |"))]
    assert len(rows) == 2 * 5  # base and new x acc and S(θ), and H, per method
    # mean ± std [95% CI over seeds x images] in each of the three wording columns (H: no interval)
    assert all(r.count(" ± ") == 3 and r.count("[") == (0 if "| H |" in r else 3) for r in rows)
    assert "maml-clip" in report.split("## Runs that did not finish")[1].split("##")[0]
    assert "erm/coop" in report.split("## Paired tests")[1] and "accuracy_per_template.png" in report
    assert all((tmp_path / "out" / "plots" / name).stat().st_size > 10_000
               for name in ("accuracy_per_template.png", "sensitivity_vs_accuracy.png", "accuracy_shift.png"))

    code, out, err = run_cli(monkeypatch, capsys, "compare", str(sweep))
    assert code == 2 and "already finished" in err and "--skip-existing" in err and "Traceback" not in err
    code, out, err = run_cli(monkeypatch, capsys, "compare", str(sweep), "--skip-existing", "--reference", "erm")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]].count("existing") == 4
    assert "zeroshot" in (tmp_path / "out" / "report.md").read_text().split("## Paired tests")[1]


def test_compare_from_flags_with_a_bad_name_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--method", "zeroshot", "--method", "ermm",
                           "--output", str(tmp_path / "x"))
    assert code == 2 and "unknown method 'ermm'" in err and "Did you mean 'erm'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_report_plot_writes_figures_and_markdown(monkeypatch, capsys, learner_docs, tmp_path):
    path = write_json(learner_docs["coop"], tmp_path / "r.json")
    code, _, err = run_cli(monkeypatch, capsys, "report", str(path), "--plot")
    assert code == 0, err
    folder = tmp_path / "r-plots"
    assert {p.name for p in folder.iterdir()} == {"accuracy_per_template.png", "sensitivity_vs_accuracy.png",
                                                  "accuracy_shift.png", "report.md"}
    assert "![accuracy per template](accuracy_per_template.png)" in (folder / "report.md").read_text()


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys, learner_docs, tmp_path):
    path = write_json(learner_docs["coop"], tmp_path / "r.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run_cli(monkeypatch, capsys, "report", str(path), "--plot")
    assert code == 2 and 'pip install "promptbench_vlm[plot]"' in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--method", "zeroshot", "--plot",
                           "--output", str(tmp_path / "y"))
    assert code == 2 and "promptbench_vlm[plot]" in err and not (tmp_path / "y").exists()


def test_several_seeds_are_tested_over_seeds_and_images_with_holm_over_the_family(learner_docs):
    a, n = learner_docs["coop"], learner_docs["noisy"]
    summaries = [summarise(Group("erm", "coop", "colours", {1: a, 2: a, 3: a}), 200),
                 summarise(Group("noisy", "coop", "colours", {1: n, 2: n, 3: n}), 200),
                 summarise(Group("flip", "coop", "colours", {1: n, 2: a, 3: a}), 200)]
    tests = compare_to_reference(summaries, "erm", n_resamples=500)
    noisy = {t.metric: t for t in tests if t.group == "noisy/coop"}
    flip = {t.metric: t for t in tests if t.group == "flip/coop"}
    assert {t.test for t in tests} == {"seeds x images"} and all(t.seeds == (1, 2, 3) for t in tests)
    assert all(t.p_holm >= t.p_value for t in tests)
    headline = [t for t in tests if t.group == "noisy/coop" and t.metric in ("acc_mean", "sensitivity")]
    perturbation = [t for t in tests if t.group == "noisy/coop" and t not in headline]
    assert headline and perturbation and {t.family[3] for t in perturbation} == {"perturbation"}
    for family in (headline, perturbation):  # two Holm families per method: m is each family's size
        ranked = sorted(family, key=lambda t: t.p_value)
        assert ranked[0].p_holm == pytest.approx(min(1.0, len(family) * ranked[0].p_value))
    # identical seeds: the seed factor adds nothing, the difference stands; one seed in three: it does not
    assert noisy["sensitivity"].significant and noisy["sensitivity"].seed_test.p_value == 0.0
    assert not flip["sensitivity"].significant and flip["sensitivity"].ci[0] <= 0 <= flip["sensitivity"].ci[1]
    assert flip["sensitivity"].seed_test.per_seed[1:] == (0.0, 0.0)
