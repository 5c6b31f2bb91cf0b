"""Sweeps that scale out: --skip-existing checks the recorded settings, --shard splits the grid,
--report-only aggregates run folders, statistics as JSON/CSV equal the report, --jobs equals serial.

Tiny model, generated colour images, one epoch: every run takes seconds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_cli, run_console, write_train_test_folders

from promptbench_vlm.compare.launch import parse_shard, shard_cells
from promptbench_vlm.compare.sweep import build_sweep, plan, read_sweep_file
from promptbench_vlm.compare.tables import DIGITS, fmt_cell
from promptbench_vlm.compare.stats import Cell
from promptbench_vlm.errors import UserError

EXAMPLE = Path(__file__).parent.parent / "examples" / "sweeps" / "toy.toml"


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    return write_train_test_folders(tmp_path_factory.mktemp("colours"), train=2, test=4)


def sweep_file(tmp_path: Path, split_folder: Path, methods: str, seeds: str, output: str) -> Path:
    (tmp_path / "t.txt").write_text("a photo of a {}.\na {}.\nitap of the {}.\n")
    path = tmp_path / f"{output}.toml"
    path.write_text(f"""
methods = {methods}
learners = ["coop"]
datasets = ["folder:{split_folder}"]
seeds = {seeds}
shots = 2
epochs = 1
batch_size = 4
lr = 0.02
templates = "{tmp_path / 't.txt'}"
perturb = "drop:strong"
bootstrap = 30
wordings = "all"
model = "{TINY_CONFIG}"
device = "cpu"
output = "{tmp_path / output}"
""")
    return path


class Cli:
    """`promptbench compare ...` in-process (fast); its exit code and stderr, as `run_console` gives them."""

    def __init__(self, monkeypatch, capsys):
        self.monkeypatch, self.capsys = monkeypatch, capsys

    def __call__(self, *args: str):
        code, _, err = run_cli(self.monkeypatch, self.capsys, "compare", *args)
        return code, err


@pytest.fixture
def cli(monkeypatch, capsys) -> Cli:
    return Cli(monkeypatch, capsys)


def metrics(result: Path) -> dict:
    return {name: body["metrics"] for name, body in json.loads(result.read_text())["subsets"].items()}


def test_shards_cover_the_grid_exactly_once_disjointly():
    specs, _ = plan(build_sweep(read_sweep_file(EXAMPLE)))
    for count in (1, 2, 3, len(specs) + 1):
        parts = [shard_cells(specs, i, count) for i in range(1, count + 1)]
        flat = [s for part in parts for s in part]
        assert len(flat) == len(specs) and set(flat) == set(specs)  # every cell once, none twice
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_cells(specs, 1, 2) == shard_cells(plan(build_sweep(read_sweep_file(EXAMPLE)))[0], 1, 2)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1/0", "x", "1/2/3"):
        with pytest.raises(UserError, match="--shard must be I/N"):
            parse_shard(bad)


def test_skip_existing_reruns_a_run_recorded_with_other_settings_and_says_why(cli, tmp_path, split_folder):
    sweep = sweep_file(tmp_path, split_folder, '["zeroshot", "erm"]', "[1]", "out")
    code, err = cli(str(sweep))
    assert code == 0, err
    train_json = next((tmp_path / "out").glob("*/erm__coop__seed1/train.json"))
    assert json.loads(train_json.read_text())["request"]["config"]["epochs"] == 1

    code, err = cli(str(sweep), "--skip-existing")  # same settings: both reused
    assert code == 0, err
    assert [r["status"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]] == [
        "existing", "existing"]

    refused = run_console("compare", str(sweep), "--skip-existing", "--refuse-mismatched", "--epochs", "2")
    assert_one_line_error(refused, "erm__coop__seed1", "config.epochs", "other settings")
    assert json.loads(train_json.read_text())["request"]["config"]["epochs"] == 1  # nothing ran

    code, err = cli(str(sweep), "--skip-existing", "--epochs", "2", "--bootstrap", "20")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "rerunning" in line]
    assert len(lines) == 2, err
    assert "zeroshot/zeroshot" in lines[0] and "(bootstrap)" in lines[0]
    assert "erm/coop" in lines[1] and "(bootstrap, config.epochs)" in lines[1]
    assert json.loads(train_json.read_text())["request"]["config"]["epochs"] == 2
    assert [r["status"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]] == [
        "done", "done"]


def cell_text(cell: dict, metric: str) -> str:
    return fmt_cell(Cell(cell["mean"], cell["std"], tuple(cell["ci"]) if cell["ci"] else None, cell["n_seeds"]),
                    DIGITS[metric])


def test_a_record_written_before_a_request_field_existed_counts_it_as_its_default():
    """train.json of an older version lacks newer request fields: they count as their defaults
    (the behaviour the run had), while a recorded value that differs is still named."""
    from dataclasses import replace

    from promptbench_vlm.train.run import TrainRequest, _jsonable, request_differences

    request = TrainRequest(method="erm", learner="coop", shots=4)
    recorded = json.loads(json.dumps(_jsonable(request), default=str))
    del recorded["preset"], recorded["dataset_options"]["split"], recorded["config"]["accumulate"]
    assert request_differences(recorded, request) == []
    assert request_differences(recorded, replace(request, preset={"name": "x"})) == ["preset"]
    changed = replace(request, config=replace(request.config, accumulate=2))
    assert request_differences(recorded, changed) == ["config.accumulate"]


def test_shards_then_report_only_equal_one_run_and_the_statistics_equal_the_report(cli, tmp_path, split_folder):
    sweep = sweep_file(tmp_path, split_folder, '["zeroshot"]', "[1, 2]", "out")
    code, err = cli(str(sweep), "--output", str(tmp_path / "whole"))
    assert code == 0, err
    for part in ("1/2", "2/2"):
        code, err = cli(str(sweep), "--shard", part)
        assert code == 0, err
        assert "--report-only" in err and not (tmp_path / "out" / "report.md").exists()
    shards = [json.loads((tmp_path / "out" / f"summary-shard{i}of2.json").read_text())["runs"] for i in (1, 2)]
    assert [[r["seed"] for r in runs] for runs in shards] == [[1], [2]]

    code, err = cli(str(sweep), "--report-only")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert stats == json.loads((tmp_path / "whole" / "statistics.json").read_text())  # same runs, same numbers
    (group,) = stats["groups"]
    assert group["seeds"] == [1, 2] and group["clean"]["base"]["acc_mean"]["n_seeds"] == 2

    report = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| zeroshot | zeroshot |")]
    (row,) = rows  # the headline: base, new, H, S(θ) base, S(θ) new
    cells = [group["base_new"][k] for k in ("base", "new", "H")]
    texts = [cell_text(c, k) for c, k in zip(cells, ("base", "new", "H"))]
    texts += [cell_text(group["clean"][s]["sensitivity"], "sensitivity") for s in ("base", "new")]
    assert row == "| " + " | ".join(["zeroshot", "zeroshot", group["dataset"], "1,2", *texts]) + " |"
    for subset in ("base", "new"):  # the perturbation tables
        for metric in ("AS", "LPR"):
            cell = group["perturbations"][subset]["drop:strong"][metric]
            table = report.split(f"**{metric} per perturbation, subset {subset}**")[1].split("**")[0]
            assert f"| {cell_text(cell, metric)} |" in table

    with (tmp_path / "out" / "statistics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    as_csv = {(r["subset"], r["perturbation"], r["metric"]): r for r in table}
    assert float(as_csv[("base-new", "", "H")]["mean"]) == group["base_new"]["H"]["mean"]
    ci = group["clean"]["new"]["sensitivity"]["ci"]
    assert [float(as_csv[("new", "", "sensitivity")][k]) for k in ("ci_low", "ci_high")] == ci
    assert len(table) == sum(len(cells) for cells in group["clean"].values()) + len(group["base_new"]) + sum(
        len(m) for labels in group["perturbations"].values() for m in labels.values())


def test_report_only_names_missing_and_mismatched_runs(cli, tmp_path, split_folder):
    sweep = sweep_file(tmp_path, split_folder, '["zeroshot"]', "[1, 2]", "out")
    assert cli(str(sweep), "--shard", "1/2")[0] == 0
    code, err = cli(str(sweep), "--report-only", "--bootstrap", "20")  # seed 1 mismatched, seed 2 missing
    assert code == 2 and "no run finished" in err
    code, err = cli(str(sweep), "--report-only")
    assert code == 0, err
    failed = (tmp_path / "out" / "report.md").read_text().split("## Runs that did not finish")[1].split("##")[0]
    assert "missing" in failed and "| 2 |" in failed and "| 1 |" not in failed
    bad = run_console("compare", str(sweep), "--shard", "3/2")
    assert_one_line_error(bad, "--shard must be I/N")


def test_jobs_2_gives_the_metrics_of_a_serial_run(cli, tmp_path, split_folder):
    sweep = sweep_file(tmp_path, split_folder, '["erm"]', "[1, 2]", "serial")
    code, err = cli(str(sweep))
    assert code == 0, err
    code, err = cli(str(sweep), "--jobs", "2", "--output", str(tmp_path / "parallel"))
    assert code == 0, err
    for seed in (1, 2):
        a, b = (next((tmp_path / out).glob(f"*/erm__coop__seed{seed}/result.json")) for out in ("serial", "parallel"))
        assert metrics(a) == metrics(b)
    assert metrics(a) != metrics(next((tmp_path / "serial").glob("*/erm__coop__seed1/result.json")))
    assert json.loads((tmp_path / "parallel" / "statistics.json").read_text()) == json.loads(
        (tmp_path / "serial" / "statistics.json").read_text())
    assert_one_line_error(run_console("compare", str(sweep), "--jobs", "0"), "--jobs must be at least 1")


def test_launcher_runs_a_2_cell_sweep_through_submitits_local_executor_and_aggregates_it(cli, tmp_path,
                                                                                           split_folder):
    sweep = sweep_file(tmp_path, split_folder, '["zeroshot"]', "[1, 2]", "out")
    sweep.write_text(sweep.read_text() + "\n[resources]\ntimeout_min = 10\ncpus_per_task = 1\n")
    code, err = cli(str(sweep), "--launcher", "local")
    assert code == 0, err
    runs = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert [(r["seed"], r["status"]) for r in runs] == [(1, "done"), (2, "done")]
    logs = sorted((tmp_path / "out" / "launcher-logs").glob("*/*.out"))
    assert len(logs) == 2  # one log per run
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert stats["groups"][0]["seeds"] == [1, 2]
    code, err = cli(str(sweep), "--report-only")  # the job array's folders aggregate again to the same numbers
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "statistics.json").read_text()) == stats
    code, err = cli(str(sweep), "--launcher", "pbs", "--output", str(tmp_path / "x"))
    assert code == 2 and "unknown launcher 'pbs'" in err and "slurm" in err
    if not shutil.which("srun"):  # no cluster here: one line, not a traceback
        assert_one_line_error(run_console("compare", str(sweep), "--launcher", "slurm", "--output", str(tmp_path / "y")),
                              "--launcher slurm", "srun")


def test_tensorboard_sink_holds_each_runs_logged_curves(cli, tmp_path, split_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = sweep_file(tmp_path, split_folder, '["zeroshot", "erm"]', "[1]", "out")
    code, err = cli(str(sweep), "--tensorboard")
    assert code == 0, err
    run = next((tmp_path / "out").glob("*/erm__coop__seed1"))
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard" / run.relative_to(tmp_path / "out")))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in logged]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32 events
    assert not list((tmp_path / "out" / "tensorboard").glob("*/zeroshot*"))  # no training, no curves
