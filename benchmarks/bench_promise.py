"""Cost of one Promise step relative to an ERM step with the same number of template forwards.

A Promise step (defaults: 30 + 30 templates, K = 3) runs K + 1 batched text forwards of 30
templates with one backward each, plus, for the logged share of improving inner updates, K
forwards of P_out without backward. The reference is an ERM step over (K + 1) · 30 templates,
encoded as K + 1 chunks of 30 (the same batching) with one backward each, then the SGD step;
with the improvement tracking on, the reference also runs K chunks of 30 without backward, so
both steps make the same template forwards and the same backwards.
The ratio therefore measures what Promise adds: the inner updates, the per-template pieces of
the weight hypergradient (image-tower jvps on the batch), H, and the surrogate. Timings
interleave the two steps and report the median ratio, which is robust to other jobs on the CPU.

Run: python benchmarks/bench_promise.py [--model toy-clip] [--learner maple] [--repeats 5]
Target: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import fill_template
from promptbench_vlm.templates import load_templates
from promptbench_vlm.train.method import build_method


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def multi_template_erm_step(learner, classnames, images, labels, chunks: int, per_chunk: int,
                            forward_only_chunks: int = 0) -> Callable[[], None]:
    """ERM's cross-entropy over chunks × per_chunk templates, one batched forward+backward per chunk,
    then `forward_only_chunks` more chunks forwarded without backward (as Promise's tracking)."""
    templates = load_templates("promptsrc60").templates
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    cached = None if learner.image_side_learned else learner.encode_images(images).detach()

    def chunk_loss(order: list[int], c: int) -> torch.Tensor:
        chosen = [templates[order[(c * per_chunk + j) % len(templates)]] for j in range(per_chunk)]
        texts = [fill_template(t, name)[0] for t in chosen for name in classnames]
        image = cached if cached is not None else learner.encode_images(images)
        text = learner.encode_texts(texts).view(per_chunk, len(classnames), -1)
        logits = learner.logit_scale * torch.einsum("bd,tcd->tbc", image, text)
        return F.cross_entropy(logits.transpose(1, 2), labels.expand(per_chunk, -1))

    def step() -> None:
        order = torch.randperm(len(templates)).tolist()
        for c in range(chunks):
            chunk_loss(order, c).backward()
        with torch.no_grad():
            for c in range(forward_only_chunks):
                chunk_loss(order, chunks + c)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def promise_step(learner, classnames, images, labels, options: dict) -> Callable[[], None]:
    """One Promise step as the shared loop runs it: surrogate loss, backward, SGD step."""
    method = build_method("promise", learner, classnames, options)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)
    cached = None if learner.image_side_learned else learner.encode_images(images).detach()

    def step() -> None:
        loss, _ = method.loss(images, labels, cached)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_ratio(promise: Callable[[], None], erm: Callable[[], None], repeats: int) -> tuple[float, float, float]:
    """Median of interleaved per-pair ratios, and the median seconds of each step."""
    promise(), erm()  # warm-up
    pairs = [(seconds(promise), seconds(erm)) for _ in range(repeats)]
    return (statistics.median(p / e for p, e in pairs), statistics.median(p for p, _ in pairs),
            statistics.median(e for _, e in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-clip")
    parser.add_argument("--learner", default="maple")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = load_dataset("toy-shapes", DatasetOptions(split="train"), "base")
    backbone = load_backbone(args.model, device="cpu")
    picks = torch.randperm(len(dataset))[: args.batch_size].tolist()
    images = torch.stack([backbone.preprocess(dataset.load(i)) for i in picks])
    labels = torch.as_tensor([dataset.labels[i] for i in picks])
    steps, per_set = 3, 30
    for track in (True, False):
        erm = multi_template_erm_step(build_learner(args.learner, backbone), dataset.classnames, images, labels,
                                      chunks=steps + 1, per_chunk=per_set, forward_only_chunks=steps if track else 0)
        learner = build_learner(args.learner, backbone)
        promise = promise_step(learner, dataset.classnames, images, labels, {"track_improvement": track})
        ratio, p_s, e_s = median_ratio(promise, erm, args.repeats)
        print(f"[promise] {args.learner} on {args.model}, track_improvement={track}: promise step {p_s:.2f} s, "
              f"erm step over {(steps + 1) * per_set} templates (+{steps * per_set * track} forward only) {e_s:.2f} s; ratio {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
