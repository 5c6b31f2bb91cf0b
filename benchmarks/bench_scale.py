"""Feature cache and torchrun data parallelism, as ratios measured in one run (no pass/fail).

1. Cache: the default evaluation (toy-clip on the toy-shapes test split, 60 templates, 4 ops x
   2 levels, bootstrap 1000) timed in-process with an empty feature cache (cold), then again
   with the cache it filled (warm). Target: warm / cold at most 0.3.
2. Data parallelism on the CPU: the same evaluation as a command (``--no-cache``), once as one
   process and once under ``torchrun --nproc-per-node 2`` (gloo), wall time of each including
   start-up. The single process runs with all the cores' threads and with one (the faster
   counts: on a busy machine extra threads can slow it down); each of the two ranks gets half.

Run: python benchmarks/bench_scale.py [--skip-torchrun]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.cache import FeatureCache
from promptbench_vlm.data import load_dataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import parse_perturbations
from promptbench_vlm.templates import load_templates


def cache_ratio(threads: int) -> None:
    torch.set_num_threads(threads)
    learner = build_learner("zeroshot", load_backbone("toy-clip", device="cpu"))
    settings = EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations("default")))
    Evaluator(learner, settings).run(load_dataset("toy-shapes", subset="new"))  # warm-up: lexicon, threads
    with tempfile.TemporaryDirectory() as folder:
        times, counts = [], []
        for _ in ("cold", "warm"):
            start = time.perf_counter()
            evaluator = Evaluator(learner, settings, cache=FeatureCache(folder), split="test")
            result = evaluator.run(load_dataset("toy-shapes"))
            times.append(time.perf_counter() - start)
            counts.append(result.counts)
    print(f"[cache] cold {times[0]:.2f} s {counts[0]}")
    print(f"[cache] warm {times[1]:.2f} s {counts[1]}")
    print(f"[cache] ratio warm / cold = {times[1] / times[0]:.2f}  (target <= 0.3)")


def command_seconds(prefix: list[str], threads: int, output: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [*prefix, "evaluate", "--no-cache", "--device", "cpu", "--output", str(output)]
    start = time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def torchrun_ratio(threads: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        single = {n: command_seconds([sys.executable, "-m", "promptbench_vlm"], n, Path(folder) / f"one{n}.json")
                  for n in sorted({threads, 1})}
        two = command_seconds([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "promptbench_vlm"], max(1, threads // 2), Path(folder) / "two.json")
    one = min(single.values())
    print("[torchrun] 1 process: " + ", ".join(f"{n} thread(s) {t:.1f} s" for n, t in single.items()))
    print(f"[torchrun] 2 processes ({max(1, threads // 2)} thread(s) each): {two:.1f} s")
    print(f"[torchrun] ratio 2-process / best 1-process = {two / one:.2f}  (CPU, gloo, start-up included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-torchrun", action="store_true")
    args = parser.parse_args()
    cache_ratio(args.threads)
    if not args.skip_torchrun:
        torchrun_ratio(args.threads)
