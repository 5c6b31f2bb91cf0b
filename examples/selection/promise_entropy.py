"""Choose Promise's entropy regulariser λ on validation wordings and validation images (never test).

    python examples/selection/promise_entropy.py --lambdas 0 0.01 0.1 --epochs 5 --seed 1

The wording protocol's seen pool (the 40 wordings every method may train on) is split again,
by family and with the same rule (docs/wordings.md), into wordings the probe trains on and
*validation wordings*; each λ trains Promise (MaPLe, 10 + 10 templates, the toy world's
settings) on the first and is scored on the toy-shapes **val** split with the second. Printed
per λ: the template-weight entropy (over P_in draws, at the end) against its maximum, validation
accuracy and S(θ). The rule (docs/methods-promise.md): the smallest λ whose entropy stays above
half its maximum, unless a larger one is better on validation accuracy. Test images and the
held-out and out-of-family wordings are never read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.fewshot import few_shot
from promptbench_vlm.train.loop import TrainConfig, train
from promptbench_vlm.train.method import build_method
from promptbench_vlm.wordings import WordingProtocol, split_wordings, write_seen_pool


def probe(lam: float, args: argparse.Namespace, train_file: str, validation: tuple[str, ...]) -> dict:
    """Train Promise with entropy_reg = `lam` on the probe's wordings; score it on the validation ones."""
    started = time.perf_counter()
    backbone = load_backbone("toy-clip", None, "cpu")
    data = few_shot(load_dataset("toy-shapes", DatasetOptions(split="train"), "base"), args.shots, args.seed, None)
    torch.manual_seed(args.seed)
    learner = build_learner("maple", backbone)
    method = build_method("promise", learner, data.classnames,
                          {"templates": train_file, "templates_in": 10, "templates_out": 10, "entropy_reg": lam,
                           "track_improvement": False})
    config = TrainConfig(epochs=args.epochs, batch_size=8, seed=args.seed)
    train(method, data, config, 0.0035)
    weights = method.summary()
    val = load_dataset("toy-shapes", DatasetOptions(split="val"), "base")
    scored = Evaluator(learner, EvalSettings(templates=validation, perturbations=(), seed=args.seed, bootstrap=0)).run(val)
    return {"lambda": lam, "w_entropy_p_in": weights["w_entropy_p_in"], "w_entropy_p_in_max": weights["w_entropy_p_in_max"],
            "top_weight": weights["top_templates"][0]["weight"], "val_acc": scored.metrics["acc_mean"].value,
            "val_sensitivity": scored.metrics["sensitivity"].value, "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON lines here.")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="promise-entropy-"))
    seen_file = write_seen_pool(folder / "seen.txt", split_wordings(WordingProtocol()))
    nested = split_wordings(WordingProtocol(pool=seen_file, held_out=1 / 3))
    train_file = write_seen_pool(folder / "probe-train.txt", nested)
    print(f"probe trains on {len(nested.seen)} of the 40 seen wordings, validates on {len(nested.held_out)}")
    for lam in args.lambdas:
        row = probe(lam, args, train_file, nested.held_out)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
