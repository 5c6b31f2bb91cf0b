"""Train the toy CLIP: ``python -m promptbench_vlm.toy.train`` writes the shipped weights and card.

Two stages, because a small ViT trained contrastively from scratch for minutes on 2 CPU cores
learns colour but hardly shape (about 20 % zero-shot accuracy), while a small ResNet, with its
convolutional prior, learns both:

1. Contrastive (symmetric cross-entropy, open_clip's `ClipLoss`) training of the teacher config
   `toy-clip-teacher.json` (ResNet image tower) on `toy-shapes` train images with captions from
   `shapes.caption`, a fresh caption for every image at every step.
2. The shipped `toy-clip.json` (ViT image tower, the text tower of the teacher's shape) takes
   the teacher's text tower and temperature as they are, and its image tower is distilled from
   the teacher's: 1 − cosine between the two image embeddings, on the train images. The result
   is a CLIP whose image side the deep-prompt learners (IVLP, MaPLe, ANPrompt) can act on.

The image pool is the train split's 64 images per class plus further train indices rendered
past the split's end (`--per-class` in all), because 3,072 images are too few for the captions'
variety and for distillation; the teacher trains on the first `teacher_per_class` of each
class. The pool is rendered under `shapes.PRETRAIN_LIGHT` (neutral), while the toy-shapes
splits are lit by `shapes.DATASET_LIGHT` (a warm lamp): the toy's domain gap between
pretraining and the downstream dataset, which leaves few-shot prompt learning something to
gain. Everything is seeded and runs with deterministic algorithms on 2 CPU threads, so the
same command gives the same weights.

The card's zero-shot figures are computed from the weights as saved (float16, as shipped), on
the test split over the 60 PromptSRC templates, the way `promptbench evaluate` computes them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from ..perturb import fill_template
from ..templates import DEFAULT_TEMPLATES, load_templates
from .model import TOY_CONFIG, TOY_DIR, TOY_WEIGHTS
from .shapes import CLASSNAMES, DATASET_LIGHT, PRETRAIN_LIGHT, SPLIT_SIZES, ToyShapes, caption, render

TEACHER_CONFIG = TOY_DIR / "toy-clip-teacher.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights; recorded in the card.

    `steps`, `lr`, `warmup`, `teacher_per_class` are the teacher's contrastive stage;
    `distill_*` the image-tower distillation into `config`.
    """

    config: str = str(TOY_CONFIG)
    teacher_config: str = str(TEACHER_CONFIG)
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    distill_steps: int = 3000
    distill_lr: float = 3e-3
    teacher_per_class: int = 256
    per_class: int = 512
    seed: int = 0
    threads: int = 2

    @property
    def teacher_images(self) -> int:
        """How many pool images (the first of each class, in index order) the teacher trains on."""
        return min(self.teacher_per_class, self.per_class) * len(CLASSNAMES)


def build_model(config: str | Path) -> tuple[torch.nn.Module, Callable, Callable]:
    """Register the open_clip config file and build (model, eval preprocess, tokenizer) from it."""
    path = Path(config)
    open_clip.add_model_config(path)
    model, _, preprocess = open_clip.create_model_and_transforms(path.stem, pretrained=None, device="cpu")
    return model, preprocess, open_clip.get_tokenizer(path.stem)


def render_pool(per_class: int, seed: int, preprocess: Callable) -> tuple[torch.Tensor, list]:
    """Preprocessed train images ``[per_class * 48, 3, H, W]`` and their (label, factors)."""
    images, meta = [], []
    for index in range(per_class * len(CLASSNAMES)):
        image, label, factors = render("train", index, seed, PRETRAIN_LIGHT)
        images.append(preprocess(image))
        meta.append((label, factors))
    return torch.stack(images), meta


def lr_at(step: int, peak: float, warmup: int, steps: int) -> float:
    """Linear warm-up then cosine decay to zero: the usual CLIP schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on 1-d parameters (norms, biases, the temperature)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def batches(n_items: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of indices, walking through shuffled epochs of the pool."""
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n_items)])
        batch, order = order[:batch_size], order[batch_size:]
        yield torch.as_tensor(batch)


@dataclass
class Trained:
    """The shipped model (eval mode) and the per-step losses of both stages."""

    model: torch.nn.Module
    contrastive_losses: list[float]
    distill_losses: list[float]


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> Trained:
    """Both stages from `cfg`: the contrastive teacher, then the distilled model.

    Thread count and deterministic mode are set for the run and restored afterwards, so a caller
    (a test) keeps its own torch settings.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        teacher, preprocess, tokenizer = build_model(cfg.teacher_config)
        images, meta = render_pool(cfg.per_class, cfg.seed, preprocess)
        n_teacher = cfg.teacher_images
        contrastive = train_contrastive(teacher, tokenizer, images[:n_teacher], meta[:n_teacher], cfg, log)
        student, _, _ = build_model(cfg.config)
        distill = distill_image_tower(teacher, student, images, cfg, log)
        return Trained(student.eval(), contrastive, distill)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_contrastive(model: torch.nn.Module, tokenizer: Callable, images: torch.Tensor, meta: list, cfg: TrainConfig,
                      log: Callable[[str], None]) -> list[float]:
    """Stage 1: CLIP training of `model` on the pool with fresh captions; the loss of every step."""
    optimizer = adamw(list(model.parameters()), cfg.lr, cfg.weight_decay)
    loss_fn = ClipLoss()
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    model.train()
    for step, batch in enumerate(batches(len(meta), cfg.batch_size, cfg.steps, rng)):
        texts = [caption(CLASSNAMES[meta[i][0]], meta[i][1], rng) for i in batch.tolist()]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        image_feats = F.normalize(model.encode_image(images[batch]), dim=-1)
        text_feats = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        loss = loss_fn(image_feats, text_feats, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"contrastive {step}/{cfg.steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.2f}")
    model.eval()
    return losses


def distill_image_tower(teacher: torch.nn.Module, student: torch.nn.Module, images: torch.Tensor, cfg: TrainConfig,
                        log: Callable[[str], None]) -> list[float]:
    """Stage 2: copy the teacher's text side into `student`, fit its image tower to the teacher's.

    Raises:
        ValueError: the two configs' text towers or embedding sizes differ.
    """
    text_side = {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}
    own = {k: v.shape for k, v in student.state_dict().items() if not k.startswith("visual.")}
    if own != {k: v.shape for k, v in text_side.items()}:
        raise ValueError("teacher and student configs must share embed_dim and text_cfg")
    student.load_state_dict(text_side, strict=False)
    with torch.no_grad():
        targets = torch.cat([F.normalize(teacher.encode_image(b), dim=-1) for b in images.split(512)])
    params = list(student.visual.parameters())
    optimizer = adamw(params, cfg.distill_lr, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 1)
    warmup = min(cfg.warmup, cfg.distill_steps // 10)
    losses: list[float] = []
    student.train()
    for step, batch in enumerate(batches(len(images), cfg.batch_size, cfg.distill_steps, rng)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.distill_lr, warmup, cfg.distill_steps)
        feats = F.normalize(student.encode_image(images[batch]), dim=-1)
        loss = (1 - (feats * targets[batch]).sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.distill_steps - 1:
            log(f"distill {step}/{cfg.distill_steps} 1-cos {loss.item():.4f}")
    student.eval()
    return losses


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the state dict as float16 safetensors (half the size; loads into the fp32 model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


@torch.inference_mode()
def zero_shot(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    dataset: ToyShapes,
    templates: Sequence[str],
    n_images: int | None = None,
) -> dict:
    """Zero-shot figures of `model` over `templates` on the first `n_images` of `dataset`.

    Logits are ``scale * cos(image, text of the filled template)``; ``sensitivity`` is the mean
    over images of the variance over templates (ddof=0) of the true-class softmax probability.
    """
    n = len(dataset) if n_images is None else n_images
    labels = torch.as_tensor(dataset.labels[:n])
    pixels = torch.stack([preprocess(dataset.load(i)) for i in range(n)])
    image_feats = torch.cat([F.normalize(model.encode_image(b), dim=-1) for b in pixels.split(256)])
    scale = float(model.logit_scale.exp())
    correct, p_true = [], []
    for template in templates:
        tokens = tokenizer([fill_template(template, c)[0] for c in dataset.classnames])
        text_feats = F.normalize(model.encode_text(tokens), dim=-1)
        logits = scale * image_feats @ text_feats.T
        correct.append((logits.argmax(1) == labels).numpy())
        p_true.append(logits.softmax(1).gather(1, labels[:, None])[:, 0].numpy())
    acc = 100.0 * np.mean(correct, axis=1)
    return {
        "n_images": n,
        "n_templates": len(templates),
        "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std()),
        "acc_min": float(acc.min()),
        "acc_max": float(acc.max()),
        "acc_spread": float(acc.max() - acc.min()),
        "sensitivity": float(np.var(np.stack(p_true), axis=0).mean()),
        "logit_scale": scale,
        "per_template_acc": [float(a) for a in acc],
    }


def load_trained(config: str | Path, weights: Path) -> tuple[torch.nn.Module, Callable, Callable]:
    """Rebuild the model from its config and saved weights, exactly as `load_backbone` does."""
    model, preprocess, tokenizer = build_model(config)
    open_clip.load_checkpoint(model, str(weights), weights_only=True, device="cpu")
    return model.eval(), preprocess, tokenizer


def make_card(cfg: TrainConfig, command: str, wall_s: float, trained: Trained, results: dict, weights: Path) -> dict:
    """The model card: what was trained, how, and how it does zero-shot."""
    return {
        "model": Path(cfg.config).stem,
        "architecture": json.loads(Path(cfg.config).read_text()),
        "teacher_architecture": json.loads(Path(cfg.teacher_config).read_text()),
        "training": {
            "command": command,
            **asdict(cfg),
            "config": Path(cfg.config).name,
            "teacher_config": Path(cfg.teacher_config).name,
            "stages": [
                "contrastive: the teacher, AdamW (no decay on 1-d params), warm-up + cosine lr, open_clip ClipLoss, "
                "a fresh caption per image per step from promptbench_vlm.toy.shapes.caption",
                "distill: the teacher's text tower and temperature copied; the image tower trained on 1 - cos to the "
                "teacher's image embedding, AdamW, warm-up + cosine lr",
            ],
            "data": (
                f"toy-shapes train indices 0..{cfg.per_class * len(CLASSNAMES) - 1} ({cfg.per_class} per class: "
                f"the {SPLIT_SIZES['train']}-per-class train split plus further train indices) under the "
                f"{PRETRAIN_LIGHT} light (the splits themselves are {DATASET_LIGHT}-lit); the teacher trains "
                f"on the first {cfg.teacher_images}"
            ),
            "wall_time_s": round(wall_s, 1),
            "contrastive_loss_first": trained.contrastive_losses[0],
            "contrastive_loss_last_100_mean": float(np.mean(trained.contrastive_losses[-100:])),
            "distill_loss_first": trained.distill_losses[0],
            "distill_loss_last_100_mean": float(np.mean(trained.distill_losses[-100:])),
        },
        "weights": {"file": weights.name, "dtype": "float16", "bytes": weights.stat().st_size},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "zero_shot": {"dataset": "toy-shapes", "split": "test", "light": DATASET_LIGHT, "templates": DEFAULT_TEMPLATES,
                      **results},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m promptbench_vlm.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=defaults.config, help="open_clip model config JSON of the shipped model")
    p.add_argument("--teacher-config", default=defaults.teacher_config, help="open_clip config of the teacher")
    p.add_argument("--steps", type=int, default=defaults.steps, help="contrastive steps of the teacher")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak rate of the teacher")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
    p.add_argument("--distill-steps", type=int, default=defaults.distill_steps)
    p.add_argument("--distill-lr", type=float, default=defaults.distill_lr)
    p.add_argument("--teacher-per-class", type=int, default=defaults.teacher_per_class,
                   help="pool images per class the teacher trains on")
    p.add_argument("--per-class", type=int, default=defaults.per_class, help="train images rendered per class")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--output", type=Path, default=TOY_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--card", type=Path, default=None, help="card file (default: beside --output, .card.json)")
    p.add_argument("--eval-images", type=int, default=None, help="zero-shot on the first N test images only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, save the weights, evaluate the saved weights zero-shot, and write the card."""
    args = parse_args(argv)
    cfg = TrainConfig(
        config=str(Path(args.config).resolve()),
        teacher_config=str(Path(args.teacher_config).resolve()),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        distill_steps=args.distill_steps,
        distill_lr=args.distill_lr,
        teacher_per_class=args.teacher_per_class,
        per_class=args.per_class,
        seed=args.seed,
    )
    command = " ".join(["python -m promptbench_vlm.toy.train", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    trained = train(cfg)
    wall_s = time.perf_counter() - start
    save_weights(trained.model, args.output)
    model, preprocess, tokenizer = load_trained(cfg.config, args.output)
    templates = load_templates(DEFAULT_TEMPLATES).templates
    results = zero_shot(model, preprocess, tokenizer, ToyShapes("test"), templates, args.eval_images)
    card = make_card(cfg, command.strip(), wall_s, trained, results, args.output)
    card_path = args.card or args.output.with_name(args.output.name.removesuffix(".safetensors") + ".card.json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(
        f"acc_mean {results['acc_mean']:.2f} spread {results['acc_spread']:.2f} "
        f"sensitivity {results['sensitivity']:.4f} -> {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), {card_path}"
    )
    return card


if __name__ == "__main__":
    main()
