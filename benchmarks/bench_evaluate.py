"""Evaluator speed and memory, as ratios measured in one run (no pass/fail).

1. Overhead: wall time of the default evaluation (toy-clip on toy-shapes test, 60 templates,
   4 ops x 2 levels, bootstrap 1000) divided by the bare open_clip work it cannot avoid:
   loading + preprocessing + `encode_image` of the same images and `encode_text` of the same
   unique prompt strings, in the same batch sizes. Target: at most 1.3.
2. Memory: a fake learner with random features, C = 1000 classes, N = 10,000 images,
   T = 60 templates (+ one perturbation). A [T, N, C] float32 logits tensor would take 2.4 GB;
   the evaluator's peak resident-memory growth is printed beside it.

Run: python benchmarks/bench_evaluate.py [--skip-memory]
"""

from __future__ import annotations

import argparse
import resource
import time
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import load_dataset
from promptbench_vlm.data.base import ImageDataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.prompts import build_prompt_table
from promptbench_vlm.learners import build_learner
from promptbench_vlm.learners.base import PromptLearner
from promptbench_vlm.perturb import load_lexicon, parse_perturbations
from promptbench_vlm.templates import load_templates


@torch.inference_mode()
def bare_encode_seconds(backbone, dataset, texts, batch_size: int, text_batch_size: int) -> float:
    """Load, preprocess and encode every image, and encode every text, with plain open_clip."""
    model, start = backbone.model, time.perf_counter()
    for i0 in range(0, len(dataset), batch_size):
        images = [backbone.preprocess(dataset.load(i)) for i in range(i0, min(i0 + batch_size, len(dataset)))]
        model.encode_image(torch.stack(images))
    for t0 in range(0, len(texts), text_batch_size):
        model.encode_text(backbone.tokenizer(texts[t0 : t0 + text_batch_size]))
    return time.perf_counter() - start


def overhead_ratio() -> None:
    torch.set_num_threads(2)
    backbone = load_backbone("toy-clip", device="cpu")
    learner = build_learner("zeroshot", backbone)
    dataset = load_dataset("toy-shapes")
    settings = EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations("default")))
    table = build_prompt_table(settings.templates, dataset.classnames, settings.perturbations, 1, 0, load_lexicon())
    Evaluator(learner, settings).run(load_dataset("toy-shapes", subset="new"))  # warm-up: caches, lexicon, threads
    start = time.perf_counter()
    result = Evaluator(learner, settings).run(dataset)
    evaluate_s = time.perf_counter() - start
    bare_s = bare_encode_seconds(backbone, dataset, table.texts, settings.batch_size, settings.text_batch_size)
    print(f"[overhead] {len(dataset)} images, {len(table.texts)} unique prompts, 60 templates x 8 perturbations")
    print(f"[overhead] evaluate {evaluate_s:.2f} s; bare open_clip encode {bare_s:.2f} s")
    print("[overhead] stages: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    print(f"[overhead] ratio evaluate / bare encode = {evaluate_s / bare_s:.2f}  (target <= 1.3)")


class _Blank(ImageDataset):
    def __init__(self, n_images: int, n_classes: int):
        self.name, self.classnames = "blank", [f"object number {c}" for c in range(n_classes)]
        self.labels = [i % n_classes for i in range(n_images)]

    def load(self, index: int) -> Image.Image:
        return Image.new("RGB", (1, 1))

    def describe(self, index: int) -> str:
        return str(index)


class RandomFeatureLearner(PromptLearner):
    """Random unit features of width 512: exercises the evaluator's memory, not a model."""

    name = "random"

    def __init__(self, dim: int = 512):
        clip = nn.Module()
        clip.logit_scale = nn.Parameter(torch.tensor(4.6052))
        backbone = SimpleNamespace(model=clip, preprocess=lambda image: torch.zeros(1), device=torch.device("cpu"))
        super().__init__(backbone)
        self.dim, self.gen = dim, torch.Generator().manual_seed(0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(torch.randn(images.shape[0], self.dim, generator=self.gen), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.normalize(torch.randn(len(texts), self.dim, generator=self.gen), dim=-1)


def memory_check(n_images: int = 10_000, n_classes: int = 1000) -> None:
    templates = load_templates().templates
    settings = EvalSettings(templates=templates, perturbations=tuple(parse_perturbations("drop:weak")),
                            bootstrap=1000, batch_size=1000, text_batch_size=8192)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    Evaluator(RandomFeatureLearner(), settings).run(_Blank(n_images, n_classes))
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 2**20
    full_gb = len(templates) * n_images * n_classes * 4 / 2**30
    print(f"[memory] C={n_classes}, N={n_images}, T={len(templates)}, drop:weak: {time.perf_counter() - start:.1f} s")
    print(f"[memory] peak RSS growth {grown_gb:.2f} GB vs {full_gb:.2f} GB for one [T, N, C] float32 tensor "
          f"(ratio {grown_gb / full_gb:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    overhead_ratio()
    if not args.skip_memory:
        memory_check()
