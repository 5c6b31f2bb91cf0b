"""Evaluator speed against the fair floor, stage costs at scale, and memory (ratios, no pass/fail).

1. Overhead: the default evaluation (toy-clip on the toy-shapes test split, 60 templates, the
   default perturbations, bootstrap 1000, no feature cache) against the *fair floor*: what the
   encoders must cost. The floor loads, preprocesses and encodes every image once (batches of
   128, as the evaluator) and encodes every unique prompt string once: all tokenised in one call
   of the same ftfy-free tokenizer, batched in global token-length order (at least as good as
   the evaluator's batches), the padding after each batch's last EOS trimmed, through open_clip's
   own modules. Reported in-process (models loaded, both warmed up) and as whole commands
   (``promptbench evaluate`` against a process that imports, loads the model and runs the floor).
   Target: in-process evaluation / floor <= 1.15.
2. Scale: the bootstrap stage at N = 50,000 images (random scores in the default layout: 60
   templates, the default perturbations, every per-image vector of the run, 1000 resamples;
   target < 1 s). The prompt table at C = 1,000 classes is in ``bench_scale.py``.
3. Memory: C = 1000, N = 10,000, T = 60 (+ one perturbation): the evaluator's peak resident
   growth against one [T, N, C] float32 logits tensor (2.4 GB).

Threads: ``OMP_NUM_THREADS`` (default 1). Ratios are medians of interleaved repetitions with
their range.

Run: python benchmarks/bench_evaluate.py [--repeats 5] [--skip-scale] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

from promptbench_vlm import metrics
from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.cache import FeatureCache
from promptbench_vlm.data import load_dataset
from promptbench_vlm.data.base import ImageDataset
from promptbench_vlm.evaluate import EvalSettings, Evaluator, Scores, TemplateScores, run_metrics
from promptbench_vlm.learners import build_learner
from promptbench_vlm.learners.base import PromptLearner
from promptbench_vlm.perturb import load_lexicon, parse_perturbations
from promptbench_vlm.prompts import build_prompt_table
from promptbench_vlm.templates import load_templates
from timing import interleaved, machine_note, measure, ratios, run_command, threads_from_env, timing_s  # benchmarks/


def trimmed_encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` stopped after the batch's last EOS (argmax pooling, causal mask)."""
    eos = ids.argmax(dim=-1)
    length = int(eos.max()) + 1
    x = model.token_embedding(ids[:, :length]) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return x[torch.arange(ids.shape[0]), eos] @ model.text_projection


@torch.inference_mode()
def floor_pass(backbone, dataset, texts: list[str], batch_size: int, text_batch_size: int) -> None:
    """One image-encoder pass per image and one trimmed text-encoder pass per unique prompt: every
    string tokenised once, all sequences batched in token-length order."""
    model = backbone.model
    for i0 in range(0, len(dataset), batch_size):
        images = [backbone.preprocess(dataset.load(i)) for i in range(i0, min(i0 + batch_size, len(dataset)))]
        model.encode_image(torch.stack(images))
    ids = backbone.tokenizer(texts)
    ids = ids[ids.argmax(dim=-1).argsort(stable=True)]
    for t0 in range(0, len(ids), text_batch_size):
        trimmed_encode_text(model, ids[t0 : t0 + text_batch_size])


def default_settings() -> EvalSettings:
    return EvalSettings(templates=load_templates().templates, perturbations=tuple(parse_perturbations("default")))


def floor_command(texts_file: str) -> None:
    """The floor as a command: imports, model load, the floor's encodes (run as a subprocess)."""
    threads_from_env()
    s = default_settings()
    floor_pass(load_backbone("toy-clip", device="cpu"), load_dataset("toy-shapes"),
                  json.loads(Path(texts_file).read_text()), s.batch_size, s.text_batch_size)


def overhead(repeats: int) -> None:
    backbone = load_backbone("toy-clip", device="cpu")
    learner = build_learner("zeroshot", backbone)
    dataset = load_dataset("toy-shapes")
    s = default_settings()
    texts = build_prompt_table(s.templates, dataset.classnames, s.perturbations, s.draws, s.seed, load_lexicon()).texts
    stages: list[dict[str, float]] = []

    # each run tokenises from scratch, as a new process does: the tokenizer's memo holds a whole
    # toy-world table, which would otherwise serve every repetition after the first on both sides
    forget = getattr(backbone.tokenizer, "forget", lambda: None)

    def evaluate() -> None:
        forget()
        stages.append(Evaluator(learner, s).run(dataset).timings)

    def floor() -> None:
        forget()
        floor_pass(backbone, dataset, texts, s.batch_size, s.text_batch_size)

    evaluate(), floor()  # warm-up
    times = interleaved({"evaluate": lambda: measure(evaluate), "floor": lambda: measure(floor)}, repeats)
    print(f"[overhead] {len(dataset)} images, {len(texts)} unique prompts, {len(s.templates)} templates x "
          f"{len(s.perturbations)} perturbations, {repeats} interleaved repetitions")
    print(f"[overhead] in-process: evaluate {timing_s(times['evaluate'])}, fair floor {timing_s(times['floor'])}")
    print("[overhead] evaluate stages (median wall s): " + ", ".join(
        f"{k} {np.median([st[k] for st in stages]):.2f}" for k in stages[0]))
    print(f"[overhead] RATIO in-process evaluation / fair floor: {ratios(times['evaluate'], times['floor'])}"
          "  (target <= 1.15)")

    with tempfile.TemporaryDirectory() as folder:
        texts_file = Path(folder) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        script = [sys.executable, str(Path(__file__).resolve()), "--floor-command", str(texts_file)]
        command = [str(Path(sys.executable).parent / "promptbench"), "evaluate", "--no-cache", "--device", "cpu",
                   "--overwrite", "--output", str(Path(folder) / "result.json")]
        whole = interleaved({"evaluate": lambda: run_command(command), "floor": lambda: run_command(script)}, repeats)
    print(f"[overhead] whole commands: promptbench evaluate {timing_s(whole['evaluate'])}, floor command "
          f"{timing_s(whole['floor'])}")
    print(f"[overhead] RATIO whole-command evaluation / floor command: {ratios(whole['evaluate'], whole['floor'])}")


class Blank(ImageDataset):
    """N one-pixel images over C classes: the image side costs nothing, the evaluator's own work shows."""

    def __init__(self, n_images: int, n_classes: int):
        self.name, self.classnames = "blank", [f"object number {c}" for c in range(n_classes)]
        self.labels = [i % n_classes for i in range(n_images)]

    def load(self, index: int) -> Image.Image:
        return Image.new("RGB", (1, 1))

    def describe(self, index: int) -> str:
        return str(index)


class RandomFeatureLearner(PromptLearner):
    """Random unit features of width 512: exercises the evaluator, not a model."""

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


def bootstrap_at_scale(n_images: int = 50_000, n_classes: int = 10, repeats: int = 3) -> None:
    """The metrics stage of a run over N images with random scores of the default layout."""
    s = default_settings()
    rng = np.random.default_rng(0)
    n_t, n_k = len(s.templates), len(s.perturbations)
    labels = rng.integers(0, n_classes, n_images)
    clean = TemplateScores(rng.integers(0, n_classes, (n_t, n_images)), rng.random((n_t, n_images), np.float32),
                           rng.random((n_t, n_images), np.float32))
    scores = Scores(clean, rng.integers(0, n_classes, n_images),
                    [rng.integers(0, n_classes, (n_t, 1, n_images)) for _ in range(n_k)],
                    [rng.random((n_t, 1, n_images)) for _ in range(n_k)],
                    [rng.random((n_t, 1, n_classes)) for _ in range(n_k)], 0)
    table = SimpleNamespace(edits=[rng.integers(0, 3, (n_t, 1, n_classes)) for _ in range(n_k)])
    groups = [metrics.clean_points(clean.pred, clean.p_true, clean.cos_true, labels, scores.pred_ens)]
    groups += [metrics.perturbation_points(clean.pred, p, labels, c, e == 0, divergence=d, edits=e)
               for p, d, c, e in zip(scores.pert_pred, scores.pert_divergence, scores.text_cos, table.edits)]
    n_vectors = sum(len(v) for _, v in groups)
    boot = [measure(lambda: metrics.with_intervals(groups, n_resamples=s.bootstrap, seed=0)) for _ in range(repeats)]
    stage = [measure(lambda: run_metrics(scores, labels, table, s)) for _ in range(repeats)]
    print(f"[scale] N={n_images:,} images, {n_vectors} per-image vectors, {s.bootstrap} resamples: shared bootstrap "
          f"{timing_s(boot)} (target < 1 s), the whole metrics stage {timing_s(stage)}")


def memory_check(n_images: int = 10_000, n_classes: int = 1000) -> None:
    templates = load_templates().templates
    settings = EvalSettings(templates=templates, perturbations=tuple(parse_perturbations("drop:weak")),
                            bootstrap=1000, batch_size=1000, text_batch_size=8192)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    Evaluator(RandomFeatureLearner(), settings).run(Blank(n_images, n_classes))
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 2**20
    full_gb = len(templates) * n_images * n_classes * 4 / 2**30
    print(f"[memory] C={n_classes}, N={n_images}, T={len(templates)}, drop:weak: {time.perf_counter() - start:.1f} s")
    print(f"[memory] RATIO peak RSS growth {grown_gb:.2f} GB / one [T, N, C] float32 tensor {full_gb:.2f} GB "
          f"= {grown_gb / full_gb:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--floor-command", metavar="TEXTS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_command:
        floor_command(args.floor_command)
        sys.exit(0)
    print(f"[machine] {machine_note()}; torch threads {threads_from_env()}")
    overhead(args.repeats)
    if not args.skip_scale:
        bootstrap_at_scale()
    if not args.skip_memory:
        memory_check()
    print(f"[machine] at the end: {machine_note()}")
