"""The `promptbench` command end to end on a tiny model and generated images, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, run_cli, run_console

from promptbench_vlm.results import read_result

TINY = ["--model", str(TINY_CONFIG)]


def test_evaluate_prints_table_and_writes_json_and_csv(monkeypatch, capsys, image_folder, tmp_path):
    (image_folder / "red" / "broken.png").write_bytes(b"definitely not a png")
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", *TINY, "--dataset", f"folder:{image_folder}",
                             "--perturb", "drop:strong,synonym", "--bootstrap", "50",
                             "--output", str(out_json), "--csv", str(out_csv))
    assert code == 0, err
    assert "accuracy, mean over templates" in out and "drop:strong" in out and "synonym:weak" in out
    doc = read_result(out_json)
    body = doc["subsets"]["all"]
    assert body["n_images"] == 12 and body["n_skipped"] == 1 and "broken.png" in body["skipped"][0]["item"]
    assert "1 corrupt image(s) skipped" in err
    assert len(body["per_template_acc"]) == 60 == len(doc["run"]["templates"])
    assert [p["label"] for p in body["perturbations"]] == ["drop:strong", "synonym:weak"]
    assert doc["run"]["seed"] == 0 and doc["run"]["backbone_sha256"] and doc["complete"] is True
    assert body["counts"]["images_encoded"] == 12
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "subset,group,metric,value,ci_low,ci_high,name"
    lpr = next(line for line in lines if line.startswith("all,drop:strong,LPR,"))
    assert lpr.endswith(",Logit Preservation Rate (% of perturbed top-1 predictions equal to the clean one)")
    assert any(line.startswith("all,drop:strong,JSD,") for line in lines)

    code, out, _ = run_cli(monkeypatch, capsys, "report", str(out_json))
    assert code == 0 and "drop:strong" in out


def test_report_of_a_result_file_written_before_issue_20_renders_lpr_under_its_name(tmp_path):
    old = Path(__file__).parent / "data" / "result-v1-before-issue20.json"
    proc = run_console("report", str(old), "--csv", str(tmp_path / "old.csv"))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "LPR Logit Preservation Rate" in text and "label preservation" not in text.lower()
    row = next(line for line in proc.stdout.splitlines() if "synonym:weak" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[0] == "synonym:weak" and cells[3].startswith("66.7") and cells[1] == cells[4] == "-"  # no edits/JSD
    csv_rows = (tmp_path / "old.csv").read_text(encoding="utf-8").splitlines()
    assert any(r.startswith("all,synonym:weak,LPR,66.6") and "Logit Preservation Rate" in r for r in csv_rows)


def test_base_new_reports_h(monkeypatch, capsys, image_folder, tmp_path):
    out_json = tmp_path / "bn.json"
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", *TINY, "--dataset", f"folder:{image_folder}",
                           "--subset", "base-new", "--perturb", "none", "--templates", "single",
                           "--bootstrap", "0", "--output", str(out_json))
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert set(doc["subsets"]) == {"base", "new"}
    assert doc["subsets"]["base"]["n_classes"] == 2 and doc["subsets"]["new"]["n_classes"] == 2
    b, n = doc["base_new"]["base"], doc["base_new"]["new"]
    assert doc["base_new"]["H"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))


def test_output_template_is_filled(monkeypatch, capsys, image_folder, tmp_path):
    pattern = str(tmp_path / "{learner}-{split}-{seed}.json")
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", *TINY, "--dataset", f"folder:{image_folder}",
                           "--perturb", "none", "--templates", "single", "--bootstrap", "0", "--seed", "7",
                           "--output", pattern)
    assert code == 0, err
    assert (tmp_path / "zeroshot-test-7.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learner", "zeroshoot"], "Did you mean 'zeroshot'"),
        (["--templates", "promptsrc61"], "unknown template set 'promptsrc61'"),
        (["--perturb", "synonim:weak"], "Did you mean 'synonym'"),
        (["--perturb", "drop:1.5"], "1.5"),
        (["--dataset", "foldr:/x"], "unknown dataset source 'foldr'"),
        (["--dataset", "folder:/no/such/dir"], "/no/such/dir"),
        (["--subset", "basic"], "unknown subset"),
        (["--device", "tpu"], "unknown device"),
        (["--model", "ViT-B-161"], "Did you mean"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, capsys, image_folder, args, message):
    base = ["evaluate", *TINY, "--dataset", f"folder:{image_folder}", "--perturb", "none", "--bootstrap", "0"]
    code, out, err = run_cli(monkeypatch, capsys, *base, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len([line for line in err.splitlines() if line.strip()]) <= 2  # rich may wrap one long line


def test_template_file_without_placeholder_and_empty_class_folder(monkeypatch, capsys, image_folder, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno placeholder here\n")
    base = ["evaluate", *TINY, "--perturb", "none", "--bootstrap", "0"]
    code, _, err = run_cli(monkeypatch, capsys, *base, "--dataset", f"folder:{image_folder}", "--templates", str(bad))
    assert code == 2 and "bad.txt:2" in err
    (image_folder / "purple").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, *base, "--dataset", f"folder:{image_folder}")
    assert code == 2 and "purple" in err


def test_checkpoint_for_another_backbone_is_refused(monkeypatch, capsys, image_folder, tmp_path, tiny_backbone):
    from promptbench_vlm.learners import build_learner

    ckpt = build_learner("zeroshot", tiny_backbone).save(tmp_path / "zs.safetensors")
    base = ["evaluate", "--dataset", f"folder:{image_folder}", "--perturb", "none", "--bootstrap", "0",
            "--templates", "single", "--output", str(tmp_path / "o.json")]
    code, _, err = run_cli(monkeypatch, capsys, *base, *TINY, "--learner", str(ckpt))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *base, "--model", "toy-clip", "--learner", str(ckpt))
    assert code == 2 and "was trained on backbone" in err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    code, _, err = run_cli(monkeypatch, capsys, *base, *TINY, "--learner", str(tmp_path / "junk.safetensors"))
    assert code == 2 and "not a valid safetensors file" in err


def test_interrupted_run_keeps_finished_subsets(monkeypatch, capsys, image_folder, tmp_path):
    from promptbench_vlm.evaluate import Evaluator

    real_run = Evaluator.run

    def run_then_interrupt(self, dataset, subset="all", partial=None):
        if subset == "new":
            raise KeyboardInterrupt
        return real_run(self, dataset, subset, partial)

    monkeypatch.setattr(Evaluator, "run", run_then_interrupt)
    out_json = tmp_path / "partial.json"
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", *TINY, "--dataset", f"folder:{image_folder}",
                           "--subset", "base-new", "--perturb", "none", "--bootstrap", "0",
                           "--output", str(out_json))
    assert code == 130 and "partial results" in err
    doc = read_result(out_json)
    assert doc["complete"] is False and list(doc["subsets"]) == ["base"]


def test_report_rejects_bad_files(monkeypatch, capsys, tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    assert run_cli(monkeypatch, capsys, "report", str(tmp_path / "x.json"))[0] == 2
    (tmp_path / "y.json").write_text(json.dumps({"schema": "promptbench_vlm/result", "schema_version": 99}))
    code, _, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "y.json"))
    assert code == 2 and "schema version 99" in err
    assert run_cli(monkeypatch, capsys, "report", str(tmp_path / "missing.json"))[0] == 2


@pytest.mark.parametrize(("what", "expected"), [("learners", "zeroshot"), ("templates", "promptsrc60"),
                                                ("perturbations", "shuffle"), ("datasets", "hf-disk")])
def test_list(monkeypatch, capsys, what, expected):
    code, out, _ = run_cli(monkeypatch, capsys, "list", what)
    assert code == 0 and expected in out


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "promptbench_vlm", "evaluate", "--learner", "zeroshoot"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Did you mean 'zeroshot'" in proc.stderr and "Traceback" not in proc.stderr
