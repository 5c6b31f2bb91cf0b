"""The public Python API: `import promptbench_vlm` is cheap, every exported name resolves, and the
notebook session of docs/api.md runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import promptbench_vlm as pb

DOC = Path(__file__).parent.parent / "docs" / "api.md"


def test_import_is_cheap_and_every_exported_name_resolves():
    probe = ("import sys, promptbench_vlm as pb; heavy = [m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules];"
             " print(heavy); [getattr(pb, n) for n in pb.__all__]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
    with pytest.raises(AttributeError, match="no attribute 'evaluat'"):
        pb.evaluat  # noqa: B018


def test_bad_settings_are_user_errors(tiny_backbone):
    learner = pb.load_learner("zeroshot", tiny_backbone)
    with pytest.raises(pb.UserError, match="unknown setting.*templatez"):
        pb.evaluate_learner(learner, "toy-shapes", templatez="single")
    with pytest.raises(pb.UserError, match="Did you mean 'n_ctx'"):
        pb.load_learner("coop", tiny_backbone, n_ctxx=4)


def test_the_docs_api_session_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented session itself
    assert (tmp_path / "results" / "zeroshot-new.csv").is_file()
    assert (tmp_path / "runs" / "erm-coop" / "learner.safetensors").is_file()
    assert namespace["comparison"].report.is_file()
