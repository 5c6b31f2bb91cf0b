"""What the package writes and ships: files with the user's umask; LICENSE, py.typed and the
result schema inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from promptbench_vlm.files import atomic_path
from promptbench_vlm.results import write_json

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(umask, tmp_path, tiny_backbone):
    from promptbench_vlm.learners import build_learner

    previous = os.umask(umask)
    try:
        result = write_json({"a": 1}, tmp_path / "r.json")
        checkpoint = build_learner("coop", tiny_backbone).save(tmp_path / "c.safetensors")
        with atomic_path(tmp_path / "t.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    for path in (result, checkpoint, tmp_path / "t.txt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_wheel_ships_license_type_marker_and_result_schema(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("promptbench_vlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "promptbench_vlm/py.typed" in names
    assert {"promptbench_vlm/schemas/result.schema.json", "promptbench_vlm/schemas/attack.schema.json"} <= set(names)
    license_file = next(n for n in names if n.endswith("/LICENSE"))
    assert "MIT License" in zipfile.ZipFile(wheel).read(license_file).decode()
