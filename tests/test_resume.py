"""Interrupted evaluations resume from their last finished unit and end with the same result file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_equal_up_to_float_order
from test_cli import run_cli

from promptbench_vlm import evaluate
from promptbench_vlm.files import atomic_path
from promptbench_vlm.results import read_result

TEMPLATES = "a photo of a {}.\na blurry photo of the {}.\na sketch of a {}.\nitap of the {}.\n"


def comparable(path: Path) -> dict:
    """A result file without what legitimately differs between runs: timings, how many features
    were encoded versus cached, and the command line and clock."""
    doc = json.loads(Path(path).read_text())
    for key in ("command", "started", "wall_time_s"):
        doc["run"].pop(key)
    for body in doc["subsets"].values():
        body.pop("timings"), body.pop("counts")
    return doc


def evaluate_args(image_folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    templates = tmp_path / "templates.txt"
    templates.write_text(TEMPLATES)
    return ["evaluate", "--model", str(TINY_CONFIG), "--dataset", f"folder:{image_folder}", "--templates",
            str(templates), "--perturb", "drop:strong,synonym", "--bootstrap", "30", *extra]


@pytest.fixture
def reference(monkeypatch, capsys, image_folder, tmp_path) -> dict:
    """The uninterrupted base-new run, without a cache."""
    path = tmp_path / "reference.json"
    code, _, err = run_cli(monkeypatch, capsys, *evaluate_args(image_folder, tmp_path, "--subset", "base-new",
                                                                "--no-cache", "--output", str(path)))
    assert code == 0, err
    return comparable(path)


def test_crash_mid_images_resumes_from_the_last_cached_chunk(monkeypatch, capsys, image_folder, tmp_path, reference):
    monkeypatch.setattr(evaluate, "CHUNK_IMAGES", 2)  # each subset (6 images) is 3 chunks
    real, calls = evaluate._encode_chunks, []

    def crash_on_fifth_chunk(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            calls.append(len(chunk[0]))
            if len(calls) == 5:  # base done (3 chunks), one chunk of new done and cached
                raise RuntimeError("power cut")
            yield chunk

    monkeypatch.setattr(evaluate, "_encode_chunks", crash_on_fifth_chunk)
    out = tmp_path / "r.json"
    args = evaluate_args(image_folder, tmp_path, "--subset", "base-new", "--cache-dir", str(tmp_path / "c"),
                         "--output", str(out))
    with pytest.raises(RuntimeError, match="power cut"):
        run_cli(monkeypatch, capsys, *args)
    partial = read_result(out)
    assert partial["complete"] is False and list(partial["subsets"]) == ["base"]

    calls.clear()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert "1 finished subset(s) kept" in err
    assert calls == [2, 2]  # only the two chunks of `new` never finished
    doc = read_result(out)
    assert doc["complete"] is True and doc["subsets"]["new"]["counts"]["images_cached"] == 2
    assert_equal_up_to_float_order(comparable(out), reference)


def test_sigterm_writes_finished_subsets_and_resume_completes(monkeypatch, capsys, image_folder, tmp_path, reference):
    out, marker = tmp_path / "r.json", tmp_path / "reached-new"
    args = evaluate_args(image_folder, tmp_path, "--subset", "base-new", "--output", str(out))
    script = (
        "import pathlib, sys, time\n"
        "from promptbench_vlm import cli\n"
        "from promptbench_vlm.evaluate import Evaluator\n"
        "real = Evaluator.run\n"
        "def run(self, dataset, subset='all', partial=None):\n"
        f"    if subset == 'new':\n        pathlib.Path({str(marker)!r}).touch()\n        time.sleep(120)\n"
        "    return real(self, dataset, subset, partial)\n"
        "Evaluator.run = run\n"
        f"sys.argv = ['promptbench', *{args!r}]\n"
        "cli.main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "partial results written" in err and "Traceback" not in err
    partial = read_result(out)
    assert partial["complete"] is False and list(partial["subsets"]) == ["base"]

    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert_equal_up_to_float_order(comparable(out), reference)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0 and "already complete" in err


def test_resume_with_time_in_output_finds_the_run_and_refuses_another(monkeypatch, capsys, image_folder, tmp_path):
    template = str(tmp_path / "out" / "{learner}__{time}.json")
    args = evaluate_args(image_folder, tmp_path, "--perturb", "none", "--output", template)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0 and "starting afresh" in err
    (written,) = (tmp_path / "out").iterdir()
    doc = json.loads(written.read_text())
    doc["complete"], doc["subsets"] = False, {}
    written.write_text(json.dumps(doc))
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0 and f"resuming {written}" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [written.name] and read_result(written)["complete"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--seed", "3", "--resume")
    assert code == 2 and "another evaluation" in err and "seed" in err and "Traceback" not in err


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
