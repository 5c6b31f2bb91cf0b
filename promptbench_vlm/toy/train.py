"""Train the toy CLIP: ``python -m promptbench_vlm.toy.train`` writes the shipped weights and card.

Contrastive (symmetric cross-entropy, open_clip's `ClipLoss`) training of the open_clip config
`toy-clip.json` on `toy-shapes` train images with captions from `shapes.caption`. The image pool
is the train split's 64 images per class plus further train indices rendered past the split's
end (`--per-class` in all), because 3,072 images are too few for the captions' variety. A fresh
caption is drawn for every image at every step. Everything is seeded and runs with deterministic
algorithms on 2 CPU threads, so the same command gives the same weights.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from ..backbone import TOY_CONFIG, TOY_WEIGHTS
from ..perturb import fill_template
from ..templates import DEFAULT_TEMPLATES, load_templates
from .shapes import CLASSNAMES, SPLIT_SIZES, ToyShapes, caption, render



@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights; recorded in the card."""

    config: str = str(TOY_CONFIG)
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    per_class: int = 256
    seed: int = 0
    threads: int = 2


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
        image, label, factors = render("train", index, seed)
        images.append(preprocess(image))
        meta.append((label, factors))
    return torch.stack(images), meta


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to zero: the usual CLIP schedule."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, list[float]]:
    """Train a model from `cfg.config`; return it (eval mode) and the loss of every step.

    Thread count and deterministic mode are set for the run and restored afterwards, so a caller
    (a test) keeps its own torch settings.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(cfg.seed)
    model, preprocess, tokenizer = build_model(cfg.config)
    images, meta = render_pool(cfg.per_class, cfg.seed, preprocess)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    loss_fn = ClipLoss()
    rng = np.random.default_rng(cfg.seed)
    order = np.empty(0, dtype=np.int64)
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(len(meta))])
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        texts = [caption(CLASSNAMES[meta[i][0]], meta[i][1], rng) for i in batch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        image_feats = F.normalize(model.encode_image(images[torch.as_tensor(batch)]), dim=-1)
        text_feats = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        loss = loss_fn(image_feats, text_feats, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step}/{cfg.steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.2f}")
    return model.eval(), losses


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


def make_card(cfg: TrainConfig, command: str, wall_s: float, losses: list[float], results: dict, weights: Path) -> dict:
    """The model card: what was trained, how, and how it does zero-shot."""
    return {
        "model": Path(cfg.config).stem,
        "architecture": json.loads(Path(cfg.config).read_text()),
        "training": {
            "command": command,
            **asdict(cfg),
            "config": Path(cfg.config).name,
            "optimizer": "AdamW (no decay on 1-d params), warm-up + cosine lr, open_clip ClipLoss",
            "data": (
                f"toy-shapes train indices 0..{cfg.per_class * len(CLASSNAMES) - 1} ({cfg.per_class} per class: "
                f"the {SPLIT_SIZES['train']}-per-class train split plus further train indices), "
                "a fresh caption per image per step from promptbench_vlm.toy.shapes.caption"
            ),
            "wall_time_s": round(wall_s, 1),
            "loss_first": losses[0],
            "loss_last_100_mean": float(np.mean(losses[-100:])),
        },
        "weights": {"file": weights.name, "dtype": "float16", "bytes": weights.stat().st_size},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "zero_shot": {"dataset": "toy-shapes", "split": "test", "templates": DEFAULT_TEMPLATES, **results},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m promptbench_vlm.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=defaults.config, help="open_clip model config JSON")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
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
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        per_class=args.per_class,
        seed=args.seed,
    )
    command = " ".join(["python -m promptbench_vlm.toy.train", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    model, losses = train(cfg)
    wall_s = time.perf_counter() - start
    save_weights(model, args.output)
    model, preprocess, tokenizer = load_trained(cfg.config, args.output)
    templates = load_templates(DEFAULT_TEMPLATES).templates
    results = zero_shot(model, preprocess, tokenizer, ToyShapes("test"), templates, args.eval_images)
    card = make_card(cfg, command.strip(), wall_s, losses, results, args.output)
    card_path = args.card or args.output.with_name(args.output.name.removesuffix(".safetensors") + ".card.json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(
        f"acc_mean {results['acc_mean']:.2f} spread {results['acc_spread']:.2f} "
        f"sensitivity {results['sensitivity']:.4f} -> {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), {card_path}"
    )
    return card


if __name__ == "__main__":
    main()
