"""The shared training loop: optimiser, schedule, data order, AMP, logging, divergence guard,
training state and data parallelism.

One loop serves every method: SGD with momentum (or AdamW where the learner's reference uses it,
`TrainingMethod.build_optimizer`) and a cosine schedule after a constant warm-up (CoOp's recipe), gradient accumulation, AMP on CUDA only, a JSONL log line per optimiser step,
and a stop with the step number on a NaN/inf loss (the last epoch's checkpoint is kept). At each
epoch end it writes the training state (`train_state`) from which ``--resume`` continues exactly.
Under torchrun every rank takes a contiguous share of each batch of one global, seeded data
order and the gradients are averaged over ranks before each step, so all ranks keep the same
parameters and the run does not depend on the number of ranks (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from .. import distributed
from ..backbone import autocast
from ..data.base import ImageDataset
from ..errors import UserError
from ..evaluate import ImageItems, collate_skipping, encode_images
from .method import TrainingMethod
from .train_state import TrainState, load_method_state, method_state, random_states, restore_random_states, save_state

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; recorded in the run's files.

    Attributes:
        epochs: Passes over the training images.
        batch_size: Images per batch over all ranks together (under torchrun each rank
            forwards its share of every batch).
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


class RankBatches(Sampler[list[int]]):
    """One epoch's batches for this rank: a seeded permutation of the data cut into batches, the
    same on every rank, each batch then cut into contiguous per-rank shares.

    One process gets whole batches: exactly what ``DataLoader(shuffle=True)`` draws from the same
    generator, so the data order depends on the seed and not on the number of ranks.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.batches = BatchSampler(RandomSampler(range(n), generator=generator), batch_size, drop_last=False)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            share = distributed.shard_range(len(batch))
            yield batch[share.start : share.stop]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class BatchStats:
    """One batch's figures on one rank, or over all ranks once combined.

    Attributes:
        images: Readable images.
        loss: Mean loss over them.
        diagnostics: The method's diagnostics (image-weighted means over ranks).
        bad: Unreadable images.
    """

    images: int
    loss: float = 0.0
    diagnostics: dict[str, float] = field(default_factory=dict)
    bad: int = 0


def forward(method: TrainingMethod, dataset: ImageDataset, images: torch.Tensor | None, indices: list[int],
            bad: int, cached: torch.Tensor | None, amp: bool) -> tuple[torch.Tensor | None, BatchStats]:
    """This rank's loss on its share of a batch (None when it has no readable image) and figures."""
    if images is None:
        return None, BatchStats(0, bad=bad)
    device = method.learner.device
    labels = torch.as_tensor([dataset.labels[i] for i in indices], device=device)
    images = images.to(device, non_blocking=True)
    feats = cached[torch.as_tensor(indices, device=cached.device)] if cached is not None else None
    with autocast(device, amp):
        loss, diagnostics = method.loss(images, labels, feats)
    return loss, BatchStats(len(indices), loss.item(), diagnostics, bad)


def combine(local: BatchStats) -> tuple[BatchStats, list[int]]:
    """The batch over all ranks, and each rank's image count (one gather; `local` in one process)."""
    parts = distributed.gather(local)
    counts = [p.images for p in parts]
    if len(parts) == 1:
        return local, counts
    total = max(sum(counts), 1)
    keys = next((p.diagnostics for p in parts if p.images), {})
    diagnostics = {k: sum(p.diagnostics[k] * p.images for p in parts if p.images) / total for k in keys}
    return BatchStats(sum(counts), sum(p.loss * p.images for p in parts) / total, diagnostics,
                      sum(p.bad for p in parts)), counts


def align_rng(counts: list[int]) -> None:
    """A rank left without images in a batch ran no loss, so drew no random numbers (Promise's
    template split): give it the generator state of a rank that did, so all keep drawing alike."""
    if 0 in counts and any(counts):
        states = distributed.gather(torch.get_rng_state())
        torch.set_rng_state(states[next(r for r, n in enumerate(counts) if n)])


@dataclass
class Window:
    """The batches accumulated since the last optimiser step (over all ranks)."""

    batches: int = 0
    loss: float = 0.0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, batch: BatchStats) -> None:
        self.batches, self.loss, self.images = self.batches + 1, self.loss + batch.loss, self.images + batch.images


def train(
    method: TrainingMethod,
    dataset: ImageDataset,
    config: TrainConfig,
    lr: float,
    log_path: Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: ProgressFn | None = None,
    state_path: Path | None = None,
    start: TrainState | None = None,
) -> TrainOutcome:
    """Train `method.learner` on `dataset` (labels index `method.classnames`).

    Under torchrun every rank calls this with the same arguments; rank 0 alone writes the log
    and the state.

    Args:
        method: The method, holding the learner.
        dataset: Training images (already few-shot sampled and subset).
        config: Optimisation settings.
        lr: Peak learning rate.
        log_path: JSONL file receiving one line per optimiser step (appended to).
        on_epoch_end: Called with the epoch number after the method's own epoch hook
            (the caller writes the "last good" checkpoint there).
        progress: ``progress(stage, done, total)`` callback.
        state_path: Where the training state is rewritten after each epoch (and its callbacks).
        start: A saved state (read from `state_path`) to continue from, after its last epoch.

    Raises:
        TrainingDiverged: on a NaN or infinite loss, naming the step.
    """
    if method.episodic:
        return train_episodes(method, dataset, config, lr, log_path, on_epoch_end, progress, state_path, start)
    learner = method.learner
    device = learner.device
    torch.manual_seed(config.seed)
    params = method.trainable_parameters()
    optimizer = method.build_optimizer(lr, config.momentum, config.weight_decay)
    use_fp16 = config.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)

    cached = None
    if not learner.image_side_learned:  # a frozen image side: encode each training image once
        cached, _, _ = encode_images(learner, dataset, batch_size=64, num_workers=config.num_workers)
        cached = cached.clone()  # leave inference mode so autograd may use it
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        ImageItems(dataset, learner.backbone.preprocess),
        batch_sampler=RankBatches(len(dataset), config.batch_size, generator),
        generator=generator,
        num_workers=config.num_workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
    )
    batches_per_epoch = len(loader)
    total_steps = math.ceil(config.epochs * batches_per_epoch / config.accumulate)
    warmup_steps = math.ceil(config.warmup_epochs * batches_per_epoch / config.accumulate)
    outcome, window = TrainOutcome(), Window()
    if start is not None:
        outcome, window = restore(start, method, optimizer, scaler, generator, params, str(state_path))
    earlier_s, step = outcome.wall_time_s, len(outcome.losses)
    log = StepLog(log_path)
    began = time.perf_counter()
    method.train()
    try:
        for epoch in range(1 + (start.epoch if start else 0), config.epochs + 1):
            for images, indices, bad in loader:
                loss, local = forward(method, dataset, images, indices, len(bad), cached, config.amp)
                batch, counts = combine(local)
                outcome.skipped_images += batch.bad if epoch == 1 else 0
                align_rng(counts)
                if not batch.images:
                    continue
                if not math.isfinite(batch.loss):
                    raise TrainingDiverged(
                        f"loss became {batch.loss} at step {step + 1} (epoch {epoch}); "
                        f"the last good checkpoint (end of epoch {epoch - 1}) is kept"
                    )
                if loss is not None:  # weighted by this rank's share of the batch: the mean over all ranks
                    share = local.images * len(counts) / batch.images
                    scaler.scale(loss * share / config.accumulate).backward()
                window.add(batch)
                if window.batches < config.accumulate:
                    continue
                for param, grad in zip(params, distributed.mean_gradients(params)):
                    param.grad = grad
                rate = lr_at(step, total_steps, warmup_steps, config, lr)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                mean_loss = window.loss / window.batches
                outcome.losses.append(mean_loss)
                elapsed = time.perf_counter() - window.started
                log.write({"step": step, "epoch": epoch, "loss": mean_loss, "lr": rate,
                           "images_per_s": window.images / max(elapsed, 1e-9), **batch.diagnostics})
                window = Window()
                if progress:
                    progress("train", step, total_steps)
            outcome.wall_time_s = earlier_s + time.perf_counter() - began
            end_epoch(epoch, config, outcome, method, optimizer, scaler, generator, window, params, on_epoch_end,
                      state_path)
        method.finish()
    finally:
        log.close()
        method.eval()
    outcome.steps = len(outcome.losses)
    outcome.wall_time_s = earlier_s + time.perf_counter() - began
    return outcome


class StepLog:
    """The JSONL step log, appended to on rank 0 (a no-op elsewhere or without a path)."""

    def __init__(self, path: Path | None):
        self.file = path.open("a", encoding="utf-8") if path and distributed.is_main() else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a running job can be followed with tail -f

    def close(self) -> None:
        if self.file:
            self.file.close()


def end_epoch(epoch: int, config: TrainConfig, outcome: TrainOutcome, method: TrainingMethod,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator,
              window: Window, params: list[torch.Tensor], on_epoch_end: Callable[[int], None] | None,
              state_path: Path | None) -> None:
    """The method's epoch hook, the caller's (the checkpoint), then the training state."""
    method.on_epoch_end(epoch, config.epochs)
    if on_epoch_end:
        on_epoch_end(epoch)
    if state_path:
        state = capture(epoch, outcome, method, optimizer, scaler, generator, window, params)
        if distributed.is_main():
            save_state(state_path, state)


def train_episodes(method: TrainingMethod, dataset: ImageDataset, config: TrainConfig, lr: float,
                   log_path: Path | None = None, on_epoch_end: Callable[[int], None] | None = None,
                   progress: ProgressFn | None = None, state_path: Path | None = None,
                   start: TrainState | None = None) -> TrainOutcome:
    """`train` for an episodic method (``method.episodic``, MAML-clip): the method draws each
    epoch's meta-steps and computes one meta-step's gradient; the loop drives them with the
    method's optimiser at the constant rate `lr` (no schedule: the meta-update's own), and owns
    the step log, the epoch hooks, the training state for ``--resume`` and the ranks.

    The method's protocol: ``start_episodes(dataset, config) -> (steps_per_epoch, skipped_images)``
    before the first epoch; ``epoch_steps(epoch)`` yields each meta-step's tasks (drawn from the
    method's own generator, saved through ``get_extra_state``); ``episodic_step(tasks, optimizer)
    -> record`` takes the meta-step on every rank (each computes its share of the tasks, the
    gradient is summed over ranks) and returns the log record, with ``loss``; it raises
    `TrainingDiverged` before stepping on a non-finite value.
    """
    torch.manual_seed(config.seed)
    per_epoch, skipped = method.start_episodes(dataset, config)
    optimizer = method.make_optimizer(lr)
    params = method.trainable_parameters()
    scaler, generator = torch.amp.GradScaler("cuda", enabled=False), torch.Generator().manual_seed(config.seed)
    outcome = TrainOutcome(skipped_images=skipped)
    if start is not None:
        outcome, _ = restore(start, method, optimizer, scaler, generator, params, str(state_path))
    earlier_s = outcome.wall_time_s
    log = StepLog(log_path)
    began = time.perf_counter()
    method.train()
    try:
        for epoch in range(1 + (start.epoch if start else 0), config.epochs + 1):
            for tasks in method.epoch_steps(epoch):
                step = len(outcome.losses) + 1
                try:
                    record = method.episodic_step(tasks, optimizer)
                except TrainingDiverged as err:
                    raise TrainingDiverged(f"{method.name} diverged at meta-step {step} (epoch {epoch}): {err}; the "
                                           f"last good checkpoint (end of epoch {epoch - 1}) is kept") from None
                outcome.losses.append(record["loss"])
                log.write({"step": step, "epoch": epoch, "lr": lr, **record})
                if progress:
                    progress("train", step, per_epoch * config.epochs)
            outcome.wall_time_s = earlier_s + time.perf_counter() - began
            end_epoch(epoch, config, outcome, method, optimizer, scaler, generator, Window(), params, on_epoch_end,
                      state_path)
        method.finish()
    finally:
        log.close()
        method.eval()
    outcome.steps = len(outcome.losses)
    outcome.wall_time_s = earlier_s + time.perf_counter() - began
    return outcome


def capture(epoch: int, outcome: TrainOutcome, method: TrainingMethod, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, generator: torch.Generator, window: Window, params: list[torch.Tensor]
            ) -> TrainState:
    """The state after `epoch`; on every rank (the pending gradients are averaged over ranks)."""
    pending = [g.detach().cpu() if g is not None else None for g in distributed.mean_gradients(params)]
    return TrainState(
        epoch=epoch, step=len(outcome.losses), losses=list(outcome.losses), skipped_images=outcome.skipped_images,
        wall_time_s=outcome.wall_time_s, learner=method.learner.learned_state(), method=method_state(method),
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        **random_states(method.learner.device, generator),
        window={"batches": window.batches, "loss": window.loss, "images": window.images}, pending=pending)


def restore(state: TrainState, method: TrainingMethod, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, generator: torch.Generator, params: list[torch.Tensor], source: str
            ) -> tuple[TrainOutcome, Window]:
    """Put back everything `state` saved; return the outcome and accumulation window so far."""
    load_method_state(method, state, source)
    optimizer.load_state_dict(state.optimizer)
    if state.scaler:  # empty when saved with the scaler off (CPU, bf16)
        scaler.load_state_dict(state.scaler)
    for param, grad in zip(params, state.pending):
        param.grad = grad.to(param.device, param.dtype) if grad is not None else None
    restore_random_states(state, method.learner.device, generator)
    outcome = TrainOutcome(losses=list(state.losses), wall_time_s=state.wall_time_s,
                           skipped_images=state.skipped_images)
    return outcome, Window(int(state.window["batches"]), state.window["loss"], int(state.window["images"]))
