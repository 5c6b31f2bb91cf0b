"""How much room a backbone leaves prompt learning: a linear probe against zero-shot.

A prompt learner whose image tower is frozen (CoOp, and in effect the deep-prompt learners with a
few shots) can classify no better than a linear classifier on the image features. When a probe
trained on more images than the few-shot budget does not beat zero-shot, prompt learning has
nothing to gain in accuracy on that data and can only be judged on robustness. This module
measures that on the toy world (or any dataset spec): zero-shot with "a photo of a {}." on the
test split, and a multinomial logistic regression on the frozen, L2-normalised features of the
train split, its weight decay chosen on the val split (the test split is never used to choose).

Run: ``python -m promptbench_vlm.toy.probe [--dataset toy-shapes] [--subset base]``
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..backbone import load_backbone
from ..data import DatasetOptions, ImageDataset, load_dataset
from ..errors import UserError
from ..evaluate import encode_images, encode_texts
from ..learners import build_learner
from ..learners.base import PromptLearner
from .model import TOY_MODEL

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class ProbeReport:
    """Accuracies (%) of the zero-shot classifier and the linear probe on one dataset subset."""

    dataset: str
    subset: str
    n_classes: int
    train_images: int
    zero_shot_train: float
    zero_shot_test: float
    probe_train: float
    probe_val: float
    probe_test: float
    weight_decay: float


def _features(learner: PromptLearner, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels, _ = encode_images(learner, dataset)
    return feats.clone(), torch.as_tensor(labels)  # clone: out of inference mode, usable in autograd


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, weight_decay: float, scale: float,
              steps: int = 1500, lr: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch Adam on the cross-entropy of ``scale * feats @ W + b`` plus ``weight_decay * ‖W‖²``.

    `scale` is the backbone's logit scale, so W starts in the range zero-shot classifiers live in.
    """
    weight = torch.zeros(feats.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * feats @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def probe_report(model: str = TOY_MODEL, dataset: str = "toy-shapes", subset: str = "base",
                 steps: int = 1500, pretrained: str | None = None) -> ProbeReport:
    """Zero-shot and linear-probe accuracies on `subset` of `dataset` (train / val / test splits).

    `pretrained` is a tag or weights file as in `load_backbone` (a candidate toy CLIP, say).
    """
    backbone = load_backbone(model, pretrained, device="cpu")
    learner = build_learner("zeroshot", backbone)
    datasets = {split: load_dataset(dataset, DatasetOptions(split=split), subset) for split in ("train", "val", "test")}
    splits = {split: _features(learner, data) for split, data in datasets.items()}
    classnames = datasets["test"].classnames
    text = encode_texts(learner, [ZERO_SHOT_TEMPLATE.format(c) for c in classnames]).clone()
    scale = float(learner.logit_scale)
    fits = {wd: fit_probe(*splits["train"], len(classnames), wd, scale, steps) for wd in WEIGHT_DECAYS}

    def probe_acc(split: str, wd: float) -> float:
        weight, bias = fits[wd]
        feats, labels = splits[split]
        return _accuracy(scale * feats @ weight + bias, labels)

    best = max(WEIGHT_DECAYS, key=lambda wd: probe_acc("val", wd))
    return ProbeReport(
        dataset=dataset, subset=subset, n_classes=len(classnames), train_images=len(splits["train"][1]),
        zero_shot_train=_accuracy(splits["train"][0] @ text.T, splits["train"][1]),
        zero_shot_test=_accuracy(splits["test"][0] @ text.T, splits["test"][1]),
        probe_train=probe_acc("train", best), probe_val=probe_acc("val", best), probe_test=probe_acc("test", best),
        weight_decay=best,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m promptbench_vlm.toy.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TOY_MODEL)
    parser.add_argument("--pretrained", default=None, help="pretrained tag or local weights file")
    parser.add_argument("--dataset", default="toy-shapes")
    parser.add_argument("--subset", default="base", choices=["all", "base", "new"])
    parser.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps of the probe")
    args = parser.parse_args()
    try:
        report = probe_report(args.model, args.dataset, args.subset, args.steps, args.pretrained)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
