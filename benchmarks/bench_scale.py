"""Feature cache and torchrun data parallelism, as ratios (no pass/fail).

1. Cache: the default evaluation (toy-clip on the toy-shapes test split, 60 templates, the
   default perturbations, bootstrap 1000) as a whole command with an empty feature cache (cold),
   then again with the cache it filled (warm), interleaved over repetitions, each with a fresh
   cache folder; the same in-process. The warm command's time is split into start-up (interpreter
   and imports), model and data set-up, and the evaluator's stages, from its result file: what
   remains when nothing is encoded. Target: warm / cold <= 0.5.
2. Data parallelism on the CPU: the same evaluation as a command (``--no-cache``), once as one
   process and once under ``torchrun --nproc-per-node 2`` (gloo), each rank and the single
   process with ``OMP_NUM_THREADS`` threads (default 1); wall time and CPU time (user + system
   of all processes), start-up included, and the CPU time net of start-up (every process imports
   torch and open_clip, and torchrun's launcher imports torch too: fixed costs the ranks cannot
   share). Target: CPU time 2 ranks / 1 process <= 1.15. Measured on the default evaluation and
   on one with 5 draws per perturbation (about 3x the work), where start-up weighs less.
3. Classes: the prompt table at C = 1,000 classes (60 templates x the default specs, about
   600,000 perturbations), built on a first run and loaded from the feature cache on later ones
   (target < 2 s), beside what seeding one generator per perturbation alone costs (the SHA-256
   of its arguments and the seeding of CPython's Mersenne Twister, which fix every perturbed
   string): the floor of a build that keeps the strings.

Ratios are medians of interleaved repetitions with their range.

Run: python benchmarks/bench_scale.py [--repeats 3] [--skip-torchrun] [--skip-classes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.cache import FeatureCache
from promptbench_vlm.data import load_dataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import _reseeder, fill_template, load_lexicon, parse_perturbations
from promptbench_vlm.prompts import draw_seed, prompt_table
from promptbench_vlm.templates import load_templates
from timing import Ratio, Timing, interleaved, machine_note, measure, ratios, run_command, threads_from_env, timing_s  # benchmarks/

MODULE = ["-m", "promptbench_vlm"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def evaluate_command(output: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """``promptbench evaluate`` as ``python -m promptbench_vlm`` (what torchrun starts per rank)."""
    return [*launcher, *MODULE, "evaluate", "--device", "cpu", "--overwrite", "--output", str(output), *extra]


def cache_ratio_in_process(repeats: int) -> None:
    learner = build_learner("zeroshot", load_backbone("toy-clip", device="cpu"))
    settings = EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations("default")))
    dataset = load_dataset("toy-shapes")
    Evaluator(learner, settings).run(load_dataset("toy-shapes", subset="new"))  # warm-up: lexicon, threads
    cold: list[Timing] = []
    warm: list[Timing] = []
    stages = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            for times in (cold, warm):
                evaluator = Evaluator(learner, settings, cache=FeatureCache(folder), split="test")
                times.append(measure(lambda: stages.append(evaluator.run(dataset).timings)))
    warm_stages = stages[1::2]
    print(f"[cache] in-process: cold {timing_s(cold)}, warm {timing_s(warm)}; warm stages (median wall s): " +
          ", ".join(f"{k} {statistics.median(st[k] for st in warm_stages):.2f}" for k in warm_stages[0]))
    print(f"[cache] RATIO in-process warm / cold: {ratios(warm, cold)}")


def cache_ratio_commands(repeats: int) -> None:
    cold: list[Timing] = []
    warm: list[Timing] = []
    profile = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            args = evaluate_command(Path(folder) / "result.json", "--cache-dir", str(Path(folder) / "cache"))
            cold.append(run_command(args))
            warm.append(run_command(args))
            doc = json.loads((Path(folder) / "result.json").read_text())
            body = doc["subsets"]["all"]
            profile.append((warm[-1].wall - doc["run"]["wall_time_s"], doc["run"]["wall_time_s"], body["timings"],
                            body["counts"]))
    print(f"[cache] whole command: cold {timing_s(cold)}, warm {timing_s(warm)} "
          f"(counts of the warm run: {profile[-1][3]})")
    start_up = statistics.median(p[0] for p in profile)
    body_s = statistics.median(p[1] for p in profile)
    stage_s = {k: statistics.median(p[2][k] for p in profile) for k in profile[0][2]}
    print(f"[cache] warm command profile (median s): interpreter start-up and imports {start_up:.2f}, model/data "
          f"set-up and output {body_s - sum(stage_s.values()):.2f}, evaluator stages " +
          ", ".join(f"{k} {v:.2f}" for k, v in stage_s.items()))
    print(f"[cache] RATIO whole-command warm / cold: {ratios(warm, cold)}  (target <= 0.5)")


START_UP = [sys.executable, "-c", "import torch, open_clip, promptbench_vlm.cli, promptbench_vlm.evaluate"]
LAUNCHER = [sys.executable, "-c", "import torch.distributed.run"]


def torchrun_ratio(repeats: int, threads: int, *extra: str) -> None:
    """Whole commands, and their CPU time net of start-up: the imports every process pays (torch,
    open_clip, the CLI; measured as a command that only imports them) and torchrun's launcher.
    `extra` options make the evaluation larger, so that its work, not start-up, dominates."""
    label = " ".join(extra) or "default"
    with tempfile.TemporaryDirectory() as folder:
        one = evaluate_command(Path(folder) / "one.json", "--no-cache", *extra)
        two = evaluate_command(Path(folder) / "two.json", "--no-cache", *extra, launcher=tuple(TORCHRUN))
        times = interleaved({"one": lambda: run_command(one), "two": lambda: run_command(two),
                             "start-up": lambda: run_command(START_UP), "launcher": lambda: run_command(LAUNCHER)},
                            repeats)
    print(f"[torchrun] evaluation {label}, {threads} thread(s) per process: 1 process {timing_s(times['one'])}; "
          f"2 ranks (gloo) {timing_s(times['two'])}; start-up alone (imports) {timing_s(times['start-up'])}, "
          f"torchrun's launcher alone {timing_s(times['launcher'])}")
    print(f"[torchrun] RATIO ({label}) 2 ranks / 1 process, whole commands: {ratios(times['two'], times['one'])}"
          "  (target: CPU <= 1.15)")
    net_one = [o.cpu - st.cpu for o, st in zip(times["one"], times["start-up"])]
    net_two = [t.cpu - 2 * st.cpu - la.cpu for t, st, la in zip(times["two"], times["start-up"], times["launcher"])]
    print(f"[torchrun] RATIO ({label}) 2 ranks / 1 process, CPU time net of start-up (each process's imports, the "
          f"launcher): {Ratio.of(net_two, net_one)} ({statistics.median(net_two):.2f} s vs "
          f"{statistics.median(net_one):.2f} s)")


def prompt_table_at_scale(repeats: int, n_classes: int = 1000) -> None:
    settings = EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations("default")))
    templates, specs, draws, seed = settings.templates, settings.perturbations, settings.draws, settings.seed
    classnames = [f"object number {c}" for c in range(n_classes)]
    lexicon = load_lexicon()

    def table(cache: FeatureCache) -> int:
        return len(prompt_table(templates, classnames, specs, draws, seed, lexicon, cache).texts)

    def seeding() -> None:  # what every build pays before any op runs
        for spec in specs:
            for r in range(draws):
                reseeded = _reseeder(spec.op, spec.amount, draw_seed(seed, r))
                for template in templates:
                    for name in classnames:
                        reseeded(*fill_template(template, name))

    built, loaded, seeded, sizes = [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            cache = FeatureCache(folder)
            built.append(measure(lambda: sizes.append(table(cache))))
            loaded.append(measure(lambda: table(cache)))
        seeded.append(measure(seeding))
    calls = len(templates) * n_classes * len(specs) * draws
    print(f"[classes] prompt table, C={n_classes:,} classes, {len(templates)} templates x {len(specs)} specs "
          f"({calls:,} perturbations, {sizes[0]:,} unique strings): first build {timing_s(built)}, loaded from the "
          f"cache {timing_s(loaded)} (target < 2 s); seeding the generators alone {timing_s(seeded)}")
    print(f"[classes] RATIO first build / seeding alone: {ratios(built, seeded)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--skip-classes", action="store_true")
    args = parser.parse_args()
    threads = threads_from_env()
    print(f"[machine] {machine_note()}; torch threads {threads}")
    cache_ratio_in_process(args.repeats)
    cache_ratio_commands(args.repeats)
    if not args.skip_torchrun:
        torchrun_ratio(args.repeats, threads)
        torchrun_ratio(args.repeats, threads, "--draws", "5")
    if not args.skip_classes:
        prompt_table_at_scale(args.repeats)
    print(f"[machine] at the end: {machine_note()}")
