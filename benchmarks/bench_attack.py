"""Attack speed: candidate wordings scored per second, and attack time against one default
evaluation at equal numbers of unique prompts (ratios, no pass/fail).

The attack (toy-clip zero-shot on the toy-shapes test split, the 60 templates as start set,
``--budget B``, no feature cache) scores B wordings, so it encodes B x C prompt strings and
every image once. The comparison is `run_evaluation` on the very B wordings the attack scored
(``--perturb none``, no bootstrap, no cache): the same images, the same B x C strings. A ratio
near 1 means the search itself (neighbour generation, beam bookkeeping, scoring two halves)
costs little beside the encoders. Medians of interleaved repetitions with their range.

Then what `compare`'s sweep-wide `cache.MemoryCache` saves: the attacks of three zero-shot cells
(seeds 1-3; the attack's own seed fixes the search, so they repeat one computation) with one
shared memory cache against three without.

Run: python benchmarks/bench_attack.py [--budget 120] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, interleaved, machine_note, measure, ratios, threads_from_env, timing_s  # noqa: E402

from promptbench_vlm.attack import AttackSettings, run_attack  # noqa: E402
from promptbench_vlm.cache import MemoryCache  # noqa: E402
from promptbench_vlm.evaluation import EvalRequest, load_evaluated_learner, run_evaluation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = threads_from_env()
    base = EvalRequest(device="cpu", output=None, cache=False, bootstrap=0, perturb="none")
    learner = load_evaluated_learner(base)
    settings = AttackSettings(budget=args.budget)
    first = run_attack(base, settings, learner=learner).doc
    scored = first["scored_templates"]
    with tempfile.TemporaryDirectory() as folder:
        pool = Path(folder) / "scored.txt"
        pool.write_text("\n".join(scored) + "\n", encoding="utf-8")
        evaluation = EvalRequest(**{**base.__dict__, "templates": str(pool)})
        docs: dict[str, dict] = {}

        def attack() -> Timing:
            return measure(lambda: docs.__setitem__("attack", run_attack(base, settings, learner=learner).doc))

        def evaluate() -> Timing:
            return measure(lambda: docs.__setitem__("eval", run_evaluation(evaluation, learner=learner).doc))

        runs = interleaved({"attack": attack, "evaluate": evaluate}, args.repeats)
    texts_attack = docs["attack"]["counts"]["texts_encoded"]
    texts_eval = docs["eval"]["subsets"]["all"]["counts"]["texts_encoded"]
    print(f"# {machine_note()}; threads {threads}; budget {args.budget}; classes {first['counts']['classes']}")
    print(f"unique prompts encoded: attack {texts_attack}, evaluation {texts_eval}")
    search_s = docs["attack"]["timings"]["search_s"]
    print(f"candidates scored per second (search stage): {len(scored) / search_s:.1f} "
          f"({texts_attack / search_s:.0f} prompt strings/s)")
    print(f"attack: {timing_s(runs['attack'])}; evaluation of the same wordings: {timing_s(runs['evaluate'])}")
    print(f"attack / evaluation at equal unique prompts: {ratios(runs['attack'], runs['evaluate'])}")

    def three_cells(shared: bool) -> Timing:
        memory = MemoryCache() if shared else None
        return measure(lambda: [run_attack(replace(base, seed=seed), settings, learner=learner, features=memory)
                                for seed in (1, 2, 3)])

    cells = interleaved({"shared": lambda: three_cells(True), "own": lambda: three_cells(False)}, args.repeats)
    print(f"three zero-shot cells' attacks, one MemoryCache / none: {ratios(cells['shared'], cells['own'])}")


if __name__ == "__main__":
    main()
