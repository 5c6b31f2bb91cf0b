"""What `promptbench evaluate --help` and the start of `evaluate` import, from ``python -X importtime``.

For each command: the total import time, the project's own share (self time of
``promptbench_vlm.*`` modules), the heaviest top-level packages, and whether the heavy ones
(torch, open_clip, scipy, datasets) were imported at all. ``--help`` should import none of them;
an evaluation needs torch and open_clip, and nothing else heavy.

Run: python benchmarks/bench_imports.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import machine_note  # benchmarks/

# torch._dynamo: torchvision.ops.roi_align imports it, open_clip.utils imports torchvision.ops (FrozenBatchNorm2d)
HEAVY = ("torch", "open_clip", "torchvision", "torch._dynamo", "timm", "scipy", "datasets", "pandas", "matplotlib")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def import_profile(args: list[str]) -> tuple[float, float, dict[str, float], set[str]]:
    """Total import seconds, the project's own (self) seconds, seconds of each top-level import and
    heavy package (cumulative), and every module imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "promptbench_vlm", *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    total, own, packages, modules = 0.0, 0.0, {}, set()
    for self_us, cumulative_us, indent, name in LINE.findall(proc.stderr):
        modules.add(name)
        if name.startswith("promptbench_vlm"):
            own += int(self_us) / 1e6
        if not indent:
            total += int(cumulative_us) / 1e6
        if not indent or name in HEAVY:  # heavy packages wherever they are first imported
            packages.setdefault(name, int(cumulative_us) / 1e6)
    return total, own, packages, modules


def report(label: str, args: list[str], repeats: int) -> None:
    runs = [import_profile(args) for _ in range(repeats)]
    total = statistics.median(r[0] for r in runs)
    own = statistics.median(r[1] for r in runs)
    heavy = [name for name in HEAVY if name in runs[-1][3]]
    top = sorted(runs[-1][2].items(), key=lambda kv: -kv[1])[:9]
    print(f"[imports] {label}: imports {total:.2f} s (median of {repeats}), the project's own modules {own:.2f} s; "
          f"heavy packages imported: {', '.join(heavy) or 'none'}")
    print(f"[imports] {label}: heaviest imports, cumulative (last run): " +
          ", ".join(f"{name} {seconds:.2f} s" for name, seconds in top))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"[machine] {machine_note()}")
    report("evaluate --help", ["evaluate", "--help"], args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        report("evaluate (start, one template, no perturbation)",
               ["evaluate", "--no-cache", "--device", "cpu", "--templates", "single", "--perturb", "none",
                "--bootstrap", "0", "--overwrite", "--output", str(Path(folder) / "result.json")], args.repeats)
