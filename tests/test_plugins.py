"""A third-party learner, installed the way pip would, is a first-class citizen.

The example package in examples/plugin_learner is "installed" into a temporary site folder: its
module plus a real ``*.dist-info`` (METADATA, and entry_points.txt built from the example's own
pyproject.toml), so `importlib.metadata.entry_points` finds it exactly as after ``pip install``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import TINY_CONFIG

from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import LEARNERS, build_learner, load_learner_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin_learner"
PLUGIN = "text-adapter"


def install_example(site: Path) -> Path:
    """Copy the example plug-in and write its dist-info into `site`, as pip would."""
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    for package in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        shutil.copytree(EXAMPLE / package, site / package)
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8"
    )
    lines = [f"{name} = {target}" for name, target in project["entry-points"]["promptbench_vlm.learners"].items()]
    entry_points = "[promptbench_vlm.learners]\n" + "\n".join(lines) + "\n"
    (dist_info / "entry_points.txt").write_text(entry_points, encoding="utf-8")
    return site


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = install_example(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plugin_learner_is_found_and_evaluated(plugin_site, tiny_backbone, colour_dataset, tmp_path):
    assert PLUGIN in LEARNERS.names()
    assert LEARNERS.origin(PLUGIN).endswith("(promptbench-text-adapter)")
    settings = EvalSettings(templates=("a photo of a {}.",), bootstrap=0)
    learner = build_learner(PLUGIN, tiny_backbone, {"ratio": 0.5})
    result = Evaluator(learner, settings).run(colour_dataset)
    reference = Evaluator(build_learner("zeroshot", tiny_backbone), settings).run(colour_dataset)
    assert result.n_images == len(colour_dataset.labels)
    assert result.per_template_acc == pytest.approx(reference.per_template_acc)  # the adapter starts at zero

    with torch.no_grad():
        learner.adapter[2].weight.normal_()
    loaded = load_learner_checkpoint(learner.save(tmp_path / "adapter.safetensors"), tiny_backbone)
    assert loaded.name == PLUGIN and loaded.options == {"ratio": 0.5, "reduction": 4}
    with torch.no_grad():
        assert torch.equal(loaded.encode_texts(["a photo of a red."]), learner.encode_texts(["a photo of a red."]))


def test_plugin_learner_through_the_cli(plugin_site, image_folder, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable, "-m", "promptbench_vlm", "evaluate", "--model", str(TINY_CONFIG), "--learner", PLUGIN,
        "--learner-opt", "ratio=0.5", "--dataset", f"folder:{image_folder}", "--perturb", "none",
        "--bootstrap", "0", "--device", "cpu", "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["run"]["learner"] == PLUGIN and doc["run"]["learner_options"] == {"ratio": 0.5, "reduction": 4}
    assert doc["subsets"]["all"]["n_images"] == 12
