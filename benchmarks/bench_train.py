"""Training speed as ratios measured in one run (no pass/fail).

For `erm` on `coop` and on `maple`: seconds per training step (loss, backward, SGD step) divided
by the seconds of a bare forward+backward of the same open_clip backbone on the same batch
(image tower on the batch, text tower on one prompt per class, CLIP cross-entropy, backward
through every backbone weight). Below 1 means the learner's step is cheaper than a plain
backbone step (frozen towers need no weight gradients; CoOp reuses cached image features).

Run: python benchmarks/bench_train.py [--model toy-clip] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.learners import build_learner
from promptbench_vlm.train.method import build_method


def batch(backbone, dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([backbone.preprocess(dataset.load(i)) for i in range(size)])
    return images, torch.as_tensor(dataset.labels[:size])


def seconds_per(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def bare_step(backbone, images, labels, texts):
    """A plain CLIP training step's forward and backward, every backbone weight trainable."""
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(True)
    ids = backbone.tokenizer(texts)

    def step():
        v = F.normalize(model.encode_image(images), dim=-1)
        u = F.normalize(model.encode_text(ids), dim=-1)
        F.cross_entropy(model.logit_scale.exp() * v @ u.T, labels).backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-clip")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = load_dataset("toy-shapes", DatasetOptions(split="train"), "base")
    for learner_name in ("coop", "maple"):
        backbone = load_backbone(args.model, device="cpu")
        images, labels = batch(backbone, dataset, args.batch_size)
        learner = build_learner(learner_name, backbone)
        method = build_method("erm", learner, dataset.classnames)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)
        cached = learner.encode_images(images).detach() if not learner.image_side_learned else None

        def erm_step():
            loss, _ = method.loss(images, labels, cached)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        texts = [f"a photo of a {c}." for c in dataset.classnames]
        erm_s = seconds_per(erm_step, args.steps)
        bare_s = seconds_per(bare_step(backbone, images, labels, texts), args.steps)
        print(f"[train] erm/{learner_name}: {1 / erm_s:.1f} steps/s; bare backbone fwd+bwd {1 / bare_s:.1f} steps/s; "
              f"ratio step time erm / bare = {erm_s / bare_s:.2f}  (batch {args.batch_size}, "
              f"{len(dataset.classnames)} classes, image features cached: {cached is not None})")


if __name__ == "__main__":
    main()
