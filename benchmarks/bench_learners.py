"""Text-encoding throughput of each built-in learner relative to zeroshot, in one run (no pass/fail).

Every learner encodes the same prompt strings (60 templates x 48 classes = 2,880 texts) on a
toy-sized model (toy-clip's architecture, 4 layers per tower, randomly initialised: timings do
not depend on the weights) in batches of 512, as the evaluator does; the ratio is the
learner's best-of-3 time over zeroshot's. Deep prompts (ivlp, maple, at the deepest depth the
model allows) should cost at most 1.5x zeroshot. CoCoOp encodes every text once per image, so
its row is the time for ONE image's worth of texts. Image encoding ratios are printed as well.

Run: python benchmarks/bench_learners.py [--model NAME_OR_CONFIG_JSON] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch

from promptbench_vlm.backbone import Backbone, load_backbone
from promptbench_vlm.toy.model import TOY_CONFIG
from promptbench_vlm.learners import build_learner
from promptbench_vlm.learners.base import PromptLearner
from promptbench_vlm.templates import load_templates

N_CLASSES = 48
TEXT_BATCH = 512


def best_times(jobs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each job over `repeats` rounds, after a warm-up round.

    Jobs run interleaved, one round at a time, so load from other processes on a shared machine
    hits every learner alike instead of skewing whichever ran during a busy spell.
    """
    best = {name: float("inf") for name in jobs}
    for round_ in range(repeats + 1):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def encode_all(learner: PromptLearner, texts: list[str], image_features: torch.Tensor) -> None:
    """Encode `texts` in evaluator-sized batches (conditioned on one image if the learner asks)."""
    for start in range(0, len(texts), TEXT_BATCH):
        batch = texts[start : start + TEXT_BATCH]
        if learner.conditional:
            learner.encode_texts(batch, image_features=image_features)
        else:
            learner.encode_texts(batch)


def toy_sized_backbone() -> Backbone:
    """toy-clip's architecture under another name, so no shipped weights are needed."""
    with tempfile.TemporaryDirectory() as folder:
        config = shutil.copy(TOY_CONFIG, f"{folder}/bench-toy-sized.json")
        return load_backbone(config, device="cpu")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="open_clip name or config JSON (default: toy-sized)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backbone = load_backbone(args.model, device="cpu") if args.model else toy_sized_backbone()
    depth = min(9, len(backbone.model.transformer.resblocks), len(backbone.model.visual.transformer.resblocks))
    setups: dict[str, dict] = {
        "zeroshot": {},
        "coop": {},
        "cocoop": {},
        "ivlp": {"depth": depth, "depth_v": depth},
        "maple": {"depth": depth},
    }
    texts = [t.format(f"object number {c}") for t in load_templates().templates for c in range(N_CLASSES)]
    size = backbone.model.visual.image_size
    images = torch.randn(32, 3, *size, generator=torch.Generator().manual_seed(0))
    learners = {name: build_learner(name, backbone, options).eval() for name, options in setups.items()}
    features = learners["zeroshot"].encode_images(images[:1])
    text_s = best_times({n: partial(encode_all, lrn, texts, features) for n, lrn in learners.items()}, args.repeats)
    image_s = best_times({n: partial(lrn.encode_images, images) for n, lrn in learners.items()}, args.repeats)
    print(f"{backbone.name}: {len(texts)} texts (60 templates x {N_CLASSES} classes), {len(images)} images, "
          f"deep prompt depth {depth}, torch threads {torch.get_num_threads()}")
    print(f"{'learner':<10} {'text s':>8} {'text ratio':>11} {'image ratio':>12}")
    for name in setups:
        text_ratio, image_ratio = text_s[name] / text_s["zeroshot"], image_s[name] / image_s["zeroshot"]
        print(f"{name:<10} {text_s[name]:>8.3f} {text_ratio:>11.2f} {image_ratio:>12.2f}")
    print("target: ivlp and maple text ratio <= 1.5 (cocoop: per image)")


if __name__ == "__main__":
    main()
