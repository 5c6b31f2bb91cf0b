"""Nothing lost: --overwrite clears only run folders promptbench wrote, and concurrent writers of
one folder wait for each other instead of deleting each other's work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, console_script, write_train_test_folders

from promptbench_vlm.errors import UserError
from promptbench_vlm.files import (LOCK, RUN_MARKER, FolderBusy, check_output_file, check_run_folder,
                                   claim_folder, reading_folder, release_folder)
from promptbench_vlm.train.run import RUN_FILES, SETTINGS


def test_overwrite_refuses_a_folder_with_a_file_we_did_not_write(tmp_path):
    mine = tmp_path / "mydata"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep")
    for replace in (False, True):
        with pytest.raises(UserError, match="not written by promptbench.*important.txt"):
            check_run_folder(mine, RUN_FILES, replace=replace, legacy=(SETTINGS,))
    ours = tmp_path / "run"
    ours.mkdir()
    (ours / RUN_MARKER).touch()
    (ours / "learner.safetensors").write_text("x")
    check_run_folder(ours, RUN_FILES, replace=True)  # only our files: may be replaced
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite.*notes.txt"):
        check_run_folder(ours, RUN_FILES, replace=True)
    assert (mine / "important.txt").read_text() == "keep" and (ours / "notes.txt").exists()


def test_the_working_directory_and_its_parents_are_never_a_run_folder(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    for folder in (Path("."), Path(".."), tmp_path, Path.home()):
        with pytest.raises(UserError, match="working directory"):
            check_run_folder(folder, RUN_FILES, replace=True)


def test_output_file_needs_overwrite_and_must_be_ours(tmp_path):
    path = tmp_path / "r.json"
    check_output_file(path, overwrite=False)
    path.write_text("{}")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_file(path, overwrite=False)
    with pytest.raises(UserError, match="not written by promptbench"):
        check_output_file(path, overwrite=True, ours=False)
    check_output_file(path, overwrite=True, ours=True)
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="not a folder"):
        check_output_file(path / "x.json", overwrite=False)


def test_a_claimed_folder_is_refused_to_a_second_writer_and_freed_with_its_process(tmp_path):
    folder = tmp_path / "run"
    claim_folder(folder, wait=False)
    claim_folder(folder, wait=False)  # this process again: nothing to do
    assert (folder / RUN_MARKER).is_file() and (folder / LOCK).read_text() != ""
    probe = ("import sys; from pathlib import Path; from promptbench_vlm.files import claim_folder, FolderBusy\n"
             "try:\n    claim_folder(Path(sys.argv[1]), wait=False)\nexcept FolderBusy as e:\n    print(e)")
    other = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True)
    assert "another process" in other.stdout and f"pid {os.getpid()}" in other.stdout
    release_folder(folder)
    other = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True)
    assert other.stdout == ""  # free again (and the other process's claim died with it)
    with reading_folder(folder):
        pass
    assert issubclass(FolderBusy, UserError)


def test_two_compare_processes_on_one_folder_both_complete_without_losing_a_run(tmp_path):
    data = write_train_test_folders(tmp_path / "data", train=2, test=1)
    args = [console_script(), "compare", "--method", "zeroshot", "--method", "erm", "--seed", "1", "--seed", "2",
            "--epochs", "1", "--shots", "2", "--batch-size", "4", "--templates", "single", "--wordings", "all",
            "--perturb", "none", "--bootstrap", "0", "--model", str(TINY_CONFIG), "--dataset", f"folder:{data}",
            "--output", str(tmp_path / "cmp"), "--skip-existing"]  # the way to share one grid among processes
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    results = sorted((tmp_path / "cmp").rglob("result.json"))
    assert len(results) == 4
    for path in results:
        assert json.loads(path.read_text())["complete"] is True
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [r["status"] in ("done", "existing") for r in summary["runs"]] == [True] * 4
    ran = sum(line.split()[:1] == ["done"] for _, err in outputs for line in err.splitlines())  # rich may wrap
    assert ran == 4  # every cell ran exactly once, by one or the other; the other reused it
