"""The shared training loop: optimiser, schedule, data order, AMP, logging, divergence guard.

One loop serves every method: SGD with momentum and a cosine schedule after a constant warm-up
(CoOp's recipe), gradient accumulation, AMP on CUDA only, a JSONL log line per optimiser step,
and a stop with the step number on a NaN/inf loss (the last epoch's checkpoint is kept).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..backbone import autocast
from ..data.base import ImageDataset
from ..errors import UserError
from ..evaluate import ImageItems, collate_skipping, encode_images
from .method import TrainingMethod

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; recorded in the run's files.

    Attributes:
        epochs: Passes over the training images.
        batch_size: Images per forward.
        lr: Peak learning rate; None uses the method's default for the learner.
        momentum, weight_decay: SGD settings (CoOp: 0.9, 5e-4).
        warmup_epochs, warmup_lr: Constant-rate warm-up before the cosine decay (CoOp: 1, 1e-5).
        accumulate: Batches per optimiser step (gradient accumulation).
        seed: Fixes the data order and every random initialisation.
        amp: Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU.
        num_workers: Image-decoding workers.
    """

    epochs: int = 5
    batch_size: int = 8
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    accumulate: int = 1
    seed: int = 1
    amp: bool = True
    num_workers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class TrainOutcome:
    """What happened: losses per optimiser step and timing."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    skipped_images: int = 0


def lr_at(step: int, total: int, warmup: int, config: TrainConfig, peak: float) -> float:
    """Constant warm-up rate for `warmup` steps, then cosine decay from `peak` to 0."""
    if step < warmup:
        return config.warmup_lr
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def train(
    method: TrainingMethod,
    dataset: ImageDataset,
    config: TrainConfig,
    lr: float,
    log_path: Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: ProgressFn | None = None,
) -> TrainOutcome:
    """Train `method.learner` on `dataset` (labels index `method.classnames`).

    Args:
        method: The method, holding the learner.
        dataset: Training images (already few-shot sampled and subset).
        config: Optimisation settings.
        lr: Peak learning rate.
        log_path: JSONL file receiving one line per optimiser step.
        on_epoch_end: Called with the epoch number after the method's own epoch hook
            (the caller writes the "last good" checkpoint there).
        progress: ``progress(stage, done, total)`` callback.

    Raises:
        TrainingDiverged: on a NaN or infinite loss, naming the step.
    """
    learner = method.learner
    device = learner.device
    torch.manual_seed(config.seed)
    params = method.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    use_fp16 = config.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)

    cached = None
    if not learner.image_side_learned:  # a frozen image side: encode each training image once
        cached, _, _ = encode_images(learner, dataset, batch_size=64, num_workers=config.num_workers)
        cached = cached.clone()  # leave inference mode so autograd may use it
    loader = DataLoader(
        ImageItems(dataset, learner.backbone.preprocess),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        num_workers=config.num_workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
    )
    batches_per_epoch = len(loader)
    total_steps = math.ceil(config.epochs * batches_per_epoch / config.accumulate)
    warmup_steps = math.ceil(config.warmup_epochs * batches_per_epoch / config.accumulate)
    outcome = TrainOutcome()
    log = log_path.open("a", encoding="utf-8") if log_path else None
    start = time.perf_counter()
    method.train()
    try:
        step, pending, window_loss, window_images, window_start = 0, 0, 0.0, 0, time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            for images, indices, bad in loader:
                outcome.skipped_images += len(bad) if epoch == 1 else 0
                if images is None:
                    continue
                labels = torch.as_tensor([dataset.labels[i] for i in indices], device=device)
                images = images.to(device, non_blocking=True)
                feats = cached[torch.as_tensor(indices, device=cached.device)] if cached is not None else None
                with autocast(device, config.amp):
                    loss, diagnostics = method.loss(images, labels, feats)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); "
                        f"the last good checkpoint (end of epoch {epoch - 1}) is kept"
                    )
                scaler.scale(loss / config.accumulate).backward()
                pending += 1
                window_loss += loss.item()
                window_images += len(indices)
                if pending < config.accumulate:
                    continue
                rate = lr_at(step, total_steps, warmup_steps, config, lr)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean_loss = window_loss / pending
                outcome.losses.append(mean_loss)
                if log:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": rate,
                              "images_per_s": window_images / max(elapsed, 1e-9), **diagnostics}
                    log.write(json.dumps(record) + "\n")
                    log.flush()  # a running job can be followed with tail -f
                pending, window_loss, window_images, window_start = 0, 0.0, 0, time.perf_counter()
                if progress:
                    progress("train", step, total_steps)
            method.on_epoch_end(epoch, config.epochs)
            if on_epoch_end:
                on_epoch_end(epoch)
        method.finish()
    finally:
        if log:
            log.close()
        method.eval()
    outcome.steps = len(outcome.losses)
    outcome.wall_time_s = time.perf_counter() - start
    return outcome
