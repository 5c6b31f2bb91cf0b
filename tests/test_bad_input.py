"""The bad-input catalogue: every case runs the installed `promptbench` console script in a
subprocess, as a user would, and must end in one clear line and exit 2, or in a correct result
with a one-line warning; never a traceback, never a silent wrong result.

The cases run side by side (a thread pool of subprocesses) on one module-wide set of files, so
the catalogue costs about one process start per core; most cases fail before any model loads,
and those that need one use the tiny model (`tests/data/tiny-clip.json`) with its weights saved
to a file, so the "randomly initialised" warning does not blur the one-line check.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, assert_one_line_error, run_console, write_colour_folder, write_train_test_folders
from PIL import Image
from safetensors.torch import save_file

from promptbench_vlm.files import claim_folder, release_folder
from promptbench_vlm.learners import build_learner
from promptbench_vlm.results import SCHEMA, SCHEMA_VERSION


@dataclass
class Case:
    """One input: the arguments (``{w}`` is the world folder), and what must come out.

    ``error``: the words of the one error line (exit 2); ``warnings``: words of the warning
    lines of a run that must succeed (exit 0); ``check``: a further check of the outcome.
    """

    args: list[str]
    error: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    cwd: str = "{w}"
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None


def _evaluate(*args: str) -> list[str]:
    return ["evaluate", "--model", str(TINY_CONFIG), "--pretrained", "{w}/tiny.safetensors", "--perturb", "none",
            "--bootstrap", "0", "--templates", "single", "--no-cache", *args]


def _train(*args: str) -> list[str]:
    return ["train", "--model", str(TINY_CONFIG), "--pretrained", "{w}/tiny.safetensors", "--epochs", "1",
            "--warmup-epochs", "0", "--shots", "2", "--batch-size", "4", "--eval-perturb", "none",
            "--eval-templates", "single", "--bootstrap", "0", *args]


def _survives(*names: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(world: Path, _: subprocess.CompletedProcess) -> None:
        for name in names:
            assert (world / name).exists(), name
    return check


def _result(name: str, test: Callable[[dict], bool]) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(world: Path, _: subprocess.CompletedProcess) -> None:
        doc = json.loads((world / name).read_text(encoding="utf-8"))
        assert test(doc), json.dumps(doc["run"])[:600]
    return check


CASES: dict[str, Case] = {
    # --- nothing lost -------------------------------------------------------------------------
    "train --overwrite on a folder we did not write": Case(
        _train("--dataset", "folder:{w}/split", "--output", "{w}/mydata", "--overwrite"),
        error=("not written by promptbench", "important.txt"), check=_survives("mydata/important.txt", "mydata/sub/x")),
    "train --overwrite on our run folder holding a user's file": Case(
        _train("--dataset", "folder:{w}/split", "--output", "{w}/ourrun", "--overwrite"),
        error=("did not write", "notes.txt"), check=_survives("ourrun/notes.txt", "ourrun/train.json")),
    "train --output . --overwrite": Case(_train("--output", ".", "--overwrite"), error=("working directory",),
                                         check=_survives("mydata/important.txt")),
    "train --output <parent of cwd> --overwrite": Case(_train("--output", "..", "--overwrite"),
                                                       error=("working directory",), cwd="{w}/mydata"),
    "train --output onto a file": Case(_train("--dataset", "folder:{w}/split", "--output", "{w}/afile"),
                                       error=("is a file",), check=_survives("afile")),
    "train into a folder another process is writing": Case(
        _train("--dataset", "folder:{w}/split", "--output", "{w}/claimed"), error=("another process",)),
    "evaluate --output onto an existing file": Case(_evaluate("--dataset", "folder:{w}/split", "--output",
                                                              "{w}/old.json"), error=("exists", "--overwrite")),
    "evaluate --output --overwrite onto a file we did not write": Case(
        _evaluate("--dataset", "folder:{w}/split", "--output", "{w}/notes.json", "--overwrite"),
        error=("not written by promptbench",), check=_survives("notes.json")),
    "evaluate --output onto a folder": Case(_evaluate("--dataset", "folder:{w}/split", "--output", "{w}/mydata"),
                                            error=("is a folder",)),
    "evaluate --output under a file (unwritable)": Case(
        _evaluate("--dataset", "folder:{w}/split", "--output", "{w}/afile/r.json"), error=("cannot write",)),
    "evaluate --csv onto a folder": Case(_evaluate("--dataset", "folder:{w}/split", "--output", "{w}/c.json",
                                                   "--csv", "{w}/mydata"), error=("--csv", "is a folder")),
    "evaluate --resume --overwrite": Case(_evaluate("--resume", "--overwrite"), error=("pass one of them",)),
    # --- numbers and names ----------------------------------------------------------------------
    "evaluate --seed -1": Case(_evaluate("--dataset", "folder:{w}/split", "--seed", "-1", "--output", "{w}/s.json"),
                               error=("--seed", "-1")),
    "train --seed -1": Case(_train("--seed", "-1", "--output", "{w}/seedrun"), error=("--seed",)),
    "train --lr nan": Case(_train("--lr", "nan", "--output", "{w}/nanrun"), error=("--lr", "nan")),
    "train --lr -0.002": Case(_train("--lr", "-0.002", "--output", "{w}/negrun"), error=("--lr", "-0.002")),
    "compare --lr nan": Case(["compare", "--method", "erm", "--lr", "nan", "--output", "{w}/cmp"], error=("lr",)),
    "compare --seed -1": Case(["compare", "--method", "zeroshot", "--seed", "-1", "--output", "{w}/cmp"],
                              error=("seeds",)),
    "compare --reference nosuch": Case(["compare", "--method", "zeroshot", "--method", "erm", "--reference",
                                        "nosuch", "--output", "{w}/cmp"], error=("--reference", "nosuch", "erm")),
    "compare --reference METHOD/LEARNER not in the grid": Case(
        ["compare", "--method", "zeroshot", "--method", "erm", "--reference", "erm/maple", "--output", "{w}/cmp"],
        error=("--reference", "erm/coop")),
    "evaluate CKPT --learner-opt": Case(_evaluate("--learner", "{w}/coop.safetensors", "--learner-opt", "n_ctx=8"),
                                        error=("--learner-opt", "checkpoint")),
    "train --init CKPT --learner-opt": Case(_train("--init", "{w}/coop.safetensors", "--learner-opt", "n_ctx=8",
                                                   "--output", "{w}/initrun"), error=("--learner-opt",)),
    "train --init CKPT --learner another": Case(_train("--init", "{w}/coop.safetensors", "--learner", "ivlp",
                                                       "--output", "{w}/initrun"), error=("'coop'", "not 'ivlp'")),
    # --- files that are not what they claim --------------------------------------------------
    "report on a binary file": Case(["report", "{w}/binary.json"], error=("not a promptbench_vlm result",)),
    "report on JSON without run (schema 1)": Case(["report", "{w}/norun-v1.json"], error=("lacks run",)),
    "report on JSON without run (current schema)": Case(["report", "{w}/norun-v2.json"],
                                                        error=("not a valid result file", "run")),
    "report on JSON without metrics (schema 1)": Case(["report", "{w}/nometrics.json"],
                                                      error=("subsets.all.metrics",)),
    "report on a folder": Case(["report", "{w}/mydata"], error=("is a folder",)),
    "compare on a folder": Case(["compare", "{w}/mydata"], error=("is a folder",)),
    "compare on a Latin-1 sweep file": Case(["compare", "{w}/latin1.toml", "--output", "{w}/cmp"],
                                            error=("--reference", "nosuch"), warnings=("not utf-8", "latin-1")),
    # --- valid inputs, read correctly ----------------------------------------------------------
    "template file with a UTF-8 BOM before a # comment; a file named 'zeroshot' in the cwd": Case(
        _evaluate("--dataset", "folder:{w}/split", "--templates", "{w}/bom.txt", "--output", "{w}/bom.json"),
        cwd="{w}/cwd",
        check=_result("bom.json", lambda d: d["run"]["templates"] == ["a photo of a {}.", "a {}."]
                      and d["run"]["learner"] == "zeroshot" and d["run"]["checkpoint"] is None)),
    "16-bit PNG images": Case(
        _evaluate("--dataset", "folder:{w}/deep", "--output", "{w}/deep.json"),
        check=_result("deep.json", lambda d: d["subsets"]["all"]["n_images"] == 4
                      and d["subsets"]["all"]["n_skipped"] == 0)),
    "Latin-1 template file and Latin-1 CoOp variants.txt": Case(
        _evaluate("--dataset", "coop:fgvc_aircraft@{w}/coop", "--templates", "{w}/latin1.txt",
                  "--output", "{w}/latin1.json"),
        warnings=("template file", "class list", "split file"),
        check=_result("latin1.json", lambda d: d["run"]["templates"] == ["une photo d'un {}, café."])),
    "train on a flat folder, with a broken few-shot cache entry": Case(
        _train("--dataset", "folder:{w}/flat", "--output", "{w}/flatrun"),
        warnings=("same images", "few-shot cache entry"),
        check=_result("flatrun/result.json", lambda d: d["run"]["learner"] == "coop")),
}


def _sixteen_bit(path: Path, level: int) -> None:
    pixels = np.full((16, 16), level, dtype=np.uint16)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_backbone) -> Path:
    """Every file the cases read, made once."""
    w = tmp_path_factory.mktemp("world")
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(w / "tiny.safetensors"))
    build_learner("coop", tiny_backbone).save(w / "coop.safetensors")
    write_train_test_folders(w / "split", train=2, test=1)
    write_colour_folder(w / "flat", per_class=2, class_stride=10)
    (w / "mydata" / "sub").mkdir(parents=True)
    (w / "mydata" / "important.txt").write_text("keep me")
    (w / "mydata" / "sub" / "x").write_text("keep me too")
    (w / "ourrun").mkdir()
    (w / "ourrun" / "train.json").write_text("{}")
    (w / "ourrun" / "notes.txt").write_text("mine")
    (w / "afile").write_text("a file")
    (w / "cwd").mkdir()
    (w / "cwd" / "zeroshot").write_text("not a checkpoint")
    (w / "old.json").write_text("{}")
    (w / "notes.json").write_text('{"my": "notes"}')
    (w / "binary.json").write_bytes(bytes(range(256)) * 4)
    for version in (1, SCHEMA_VERSION):
        (w / f"norun-v{version}.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": version,
                                                              "subsets": {}}))
    run = {"learner": "zeroshot", "model": "m", "dataset": "d", "split": "test", "templates": ["a {}."]}
    (w / "nometrics.json").write_text(json.dumps({"schema": SCHEMA, "schema_version": 1, "run": run,
                                                  "subsets": {"all": {"n_images": 1}}}))
    (w / "bom.txt").write_bytes("\ufeff# a comment after the BOM\na photo of a {}.\n\ufeffa {}.\n".encode())
    (w / "latin1.txt").write_bytes("une photo d'un {}, café.\n".encode("latin-1"))
    (w / "latin1.toml").write_bytes('# méthodes\nmethods = ["zeroshot"]\nreference = "nosuch"\n'.encode("latin-1"))
    air = w / "coop" / "fgvc_aircraft"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_bytes("Airbus\nCessna Café\n".encode("latin-1"))
    (air / "images_variant_test.txt").write_bytes("1 Airbus\n2 Cessna Café\n".encode("latin-1"))
    for i, rgb in ((1, (200, 30, 30)), (2, (30, 30, 200))):
        Image.new("RGB", (16, 16), rgb).save(air / "images" / f"{i}.jpg")
    for c, level in (("dark", 4000), ("light", 60000)):
        (w / "deep" / c).mkdir(parents=True)
        for i in range(2):
            _sixteen_bit(w / "deep" / c / f"{i}.png", level + 100 * i)
    return w


@pytest.fixture(scope="module")
def outcomes(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Run every case (4 at a time), with a private cache holding a broken few-shot entry and one
    run folder claimed by this process."""
    from promptbench_vlm.data import DatasetOptions, load_dataset

    cache = tmp_path_factory.mktemp("catalogue-cache")
    flat = load_dataset(f"folder:{world}/flat", DatasetOptions(split="train"), "base")
    (cache / "fewshot").mkdir()
    (cache / "fewshot" / f"{flat.fingerprint()}_shot2_seed1.json").write_text('{"indices": 5}')
    claim_folder(world / "claimed", wait=False)

    def run(case: Case) -> subprocess.CompletedProcess:
        fill = lambda text: text.replace("{w}", str(world))  # noqa: E731
        return run_console(*map(fill, case.args), cwd=fill(case.cwd),
                           env={"PROMPTBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"})

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip(CASES, pool.map(run, CASES.values())))
    finally:
        release_folder(world / "claimed")


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name: str, outcomes: dict[str, subprocess.CompletedProcess], world: Path) -> None:
    case, proc = CASES[name], outcomes[name]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    warned = [line for line in lines if line.startswith("warning:")]
    for needle in case.warnings:
        assert any(needle.lower() in line.lower() for line in warned), (needle, proc.stderr[-2000:])
    if case.error:
        others = [line for line in lines if not (case.warnings and line.startswith("warning:"))]
        proc_without_warnings = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout,
                                                            "\n".join(others))
        assert_one_line_error(proc_without_warnings, *case.error)
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(warned) == len(case.warnings), proc.stderr[-2000:]
    if case.check:
        case.check(world, proc)


def test_catalogue_size() -> None:
    """The issue names 32 inputs that ended in a traceback or a silent wrong result; all are here."""
    assert len(CASES) >= 32, len(CASES)

