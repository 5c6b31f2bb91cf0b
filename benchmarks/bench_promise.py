"""What a Promise step costs against the ERM it replaces, as ratios (no pass/fail).

Users weigh Promise against plain training before launching 11 data sets x 3 seeds, so the
reference is what they would otherwise run:

1. Promise / ERM: a Promise step (defaults: 30 + 30 templates, K = 3 inner steps, improvement
   tracking on) against a real ERM step (the learner's one training template), both through
   their registered methods: loss, backward, SGD step, on the same batch.
2. Promise / multi-template ERM: against `erm-multi` (the multi-template control, its default
   10 wordings a step).
3. The ratio of the old "same template forwards" reference, an ERM step over (K + 1) x 30
   templates (K + 1 chunks of 30, one backward each, plus K x 30 forwards without backward):
   what Promise adds beyond its template forwards.

The shared training loop runs the same number of steps per epoch for every method (same
images, batch size and epochs), so each step ratio is also the ratio at equal epochs; the
whole ``promptbench train`` commands at equal epochs are timed beside them (start-up and the
final evaluation included).

Threads: ``OMP_NUM_THREADS`` (default 1). Ratios are medians of interleaved repetitions with
their range.

Run: python benchmarks/bench_promise.py [--model toy-clip] [--learner maple] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.data import DatasetOptions, load_dataset
from promptbench_vlm.learners import build_learner
from promptbench_vlm.perturb import fill_template
from promptbench_vlm.templates import load_templates
from promptbench_vlm.train.method import build_method
from timing import interleaved, machine_note, measure, ratios, run_command, threads_from_env, timing_s  # benchmarks/


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


def method_step(name: str, learner, classnames, images, labels, options: dict | None = None) -> Callable[[], None]:
    """One step of a registered method as the shared loop runs it: loss, backward, SGD step."""
    method = build_method(name, learner, classnames, options or {})
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-3, momentum=0.9)
    cached = None if learner.image_side_learned else learner.encode_images(images).detach()

    def step() -> None:
        loss, _ = method.loss(images, labels, cached)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_command(method: str, learner: str, model: str, folder: Path, shots: int, epochs: int) -> list[str]:
    return [sys.executable, "-m", "promptbench_vlm", "train", "--method", method, "--learner", learner, "--model", model,
            "--shots", str(shots), "--epochs", str(epochs), "--eval-templates", "single", "--eval-perturb", "none",
            "--bootstrap", "0", "--device", "cpu", "--output", str(folder / method), "--overwrite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-clip")
    parser.add_argument("--learner", default="maple")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--command-shots", type=int, default=1, help="shots of the whole-command comparison")
    parser.add_argument("--skip-commands", action="store_true")
    args = parser.parse_args()
    print(f"[machine] {machine_note()}; torch threads {threads_from_env()}")
    torch.manual_seed(0)
    dataset = load_dataset("toy-shapes", DatasetOptions(split="train"), "base")
    backbone = load_backbone(args.model, device="cpu")
    picks = torch.randperm(len(dataset))[: args.batch_size].tolist()
    images = torch.stack([backbone.preprocess(dataset.load(i)) for i in picks])
    labels = torch.as_tensor([dataset.labels[i] for i in picks])
    names = dataset.classnames
    steps, per_set = 3, 30
    fns = {
        "promise": method_step("promise", build_learner(args.learner, backbone), names, images, labels),
        "erm": method_step("erm", build_learner(args.learner, backbone), names, images, labels),
        "erm-multi": method_step("erm-multi", build_learner(args.learner, backbone), names, images, labels),
        "erm x 120 templates": multi_template_erm_step(build_learner(args.learner, backbone), names, images, labels,
                                                       chunks=steps + 1, per_chunk=per_set, forward_only_chunks=steps),
    }
    for fn in fns.values():
        fn()  # warm-up
    times = interleaved({k: (lambda fn=fn: measure(fn)) for k, fn in fns.items()}, args.repeats)
    where = f"{args.learner} on {args.model}, batch {args.batch_size}, {args.repeats} interleaved repetitions"
    print(f"[promise] {where}: median step " + ", ".join(f"{k} {timing_s(v)}" for k, v in times.items()))
    print(f"[promise] RATIO Promise / ERM step (= at equal epochs): {ratios(times['promise'], times['erm'])}")
    print(f"[promise] RATIO Promise / multi-template ERM (erm-multi) step: "
          f"{ratios(times['promise'], times['erm-multi'])}")
    print(f"[promise] RATIO Promise / ERM over the same {(steps + 1) * per_set} template forwards: "
          f"{ratios(times['promise'], times['erm x 120 templates'])}")
    if args.skip_commands:
        return
    with tempfile.TemporaryDirectory() as folder:
        commands = {m: train_command(m, args.learner, args.model, Path(folder), args.command_shots, 1)
                    for m in ("promise", "erm", "erm-multi")}
        whole = interleaved({m: (lambda c=c: run_command(c)) for m, c in commands.items()}, max(1, args.repeats // 2))
    print(f"[promise] whole train commands, {args.command_shots} shot(s), 1 epoch: " + ", ".join(
        f"{k} {timing_s(v)}" for k, v in whole.items()))
    print(f"[promise] RATIO whole command Promise / ERM: {ratios(whole['promise'], whole['erm'])}")
    print(f"[promise] RATIO whole command Promise / erm-multi: {ratios(whole['promise'], whole['erm-multi'])}")


if __name__ == "__main__":
    main()
