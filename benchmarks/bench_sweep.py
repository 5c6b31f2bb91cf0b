"""Wall time of a 4-cell toy sweep with ``compare --jobs 2`` divided by the same sweep run serially.

Both are whole ``promptbench compare`` commands (start-up, four runs of erm/coop on toy-shapes,
report), interleaved over repetitions, each into a fresh folder. With ``--jobs 2`` each worker
is a spawned process that imports torch and loads the backbone itself, and gets
``threads // 2`` CPU threads (at least one): on CPU the gain is bounded by the free cores, and on a
loaded 2-core machine the ratio mostly shows that overhead. The printed figure is the measurement;
nothing is assumed.

Run: OMP_NUM_THREADS=2 python benchmarks/bench_sweep.py [--repeats 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from timing import Ratio, interleaved, machine_note, run_command, threads_from_env, timing_s, walls


def compare_command(output: Path, epochs: int, jobs: int) -> list[str]:
    script = Path(sys.executable).parent / "promptbench"
    return [str(script), "compare", "--method", "erm", "--learner", "coop", "--dataset", "toy-shapes",
            *(f"--seed={s}" for s in (1, 2, 3, 4)), "--shots", "4", "--epochs", str(epochs), "--bootstrap", "50",
            "--perturb", "drop:strong", "--wordings", "all", "--device", "cpu", "--output", str(output),
            "--jobs", str(jobs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    threads = threads_from_env()
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    count = iter(range(10**6))

    def sweep(jobs: int):
        def run():
            return run_command(compare_command(root / f"run{next(count)}", args.epochs, jobs))
        return run

    try:
        runs = interleaved({"serial": sweep(1), "jobs2": sweep(2)}, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"4-cell toy sweep (erm/coop/toy-shapes, 4 seeds, {args.epochs} epoch(s)), {threads} thread(s); "
          f"{machine_note()}")
    print(f"serial:  {timing_s(runs['serial'])}")
    print(f"--jobs 2: {timing_s(runs['jobs2'])}")
    print(f"wall --jobs 2 / serial: {Ratio.of(walls(runs['jobs2']), walls(runs['serial']))} over {args.repeats} "
          "interleaved repetitions")


if __name__ == "__main__":
    main()
