"""MAML meta-prompts with gradient clipping (Kim & Ok): learn an initialisation of a learner's
prompt parameters that adapts well to new classification tasks in a few gradient steps.

Per meta-step, for each task T_i (a set of classes; see `maml_tasks`): the support set D_i and
query set D'_i are drawn disjointly; the inner loop runs p'_i = p − α ∇_p L(D_i; p) a few times;
the outer gradient G = ∇_p Σ_i L(D'_i; p'_i) flows back through the inner steps (second order,
double backward; `first_order` treats the inner gradients as constants, FOMAML), is clipped as
G · γ / max(‖G‖₂, γ) and applied by Adam with rate β. The result is an ordinary learner
checkpoint: the meta-prompt, used zero-shot as is or as ``--init`` of any other method.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..data.base import CorruptImageError, ImageDataset
from ..errors import UserError
from ..evaluate import ImageItems, encode_images
from ..learners.base import PromptLearner
from ..options import option
from ..perturb import fill_template
from .loop import TrainConfig, TrainingDiverged
from .maml_tasks import draw_batches, images_by_class, partition_classes, split_task
from .method import TrainingMethod
from .promptsrc import frozen_text_target, self_regulated_loss

Params = dict[str, torch.Tensor]
REGULATION = {"text": 25.0, "image": 10.0, "kl": 1.0}
"""PromptSRC's loss weights (its configs' TEXT/IMAGE_LOSS_WEIGHT, and 1 for the KL term)."""
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MAMLClipOptions:
    """Options of `maml-clip` (see `MAMLClip`)."""

    inner_lr: float | None = option(None, "Inner rate alpha; none: 0.025/6, or 0.02/6 for deep-prompt learners.")
    inner_steps: int = option(4, "Inner updates per task.")
    inner_batch: int | None = option(None, "Support images per inner step; 0 = the whole support set; none: 32, "
                                     "8 for image-conditional learners (MP-CoCoOp).")
    query_batch: int | None = option(None, "Query images in the outer loss; none: as inner_batch; 0 = the whole set.")
    support_shots: int = option(5, "K, support shots per class; the query takes the class's other few-shot images.")
    task_classes: int | None = option(None, "Classes per task; none: 5 with one --dataset, 0 (a whole dataset) with "
                                      "several; 0 = every class of a source.")
    meta_batch: int = option(1, "Tasks whose query losses are summed into one outer gradient.")
    clip_norm: float = option(5.0, "gamma of the outer-gradient clipping.")
    first_order: bool = option(False, "Drop the second-order term (FOMAML).")
    optimizer: Literal["adam", "sgd"] = option("adam", "The outer optimiser: adam (the paper) or plain sgd.")
    template: str = option("{}.", "The training template ({} = class name).")
    loss: Literal["ce", "promptsrc"] = option("ce", "The task loss, inner and outer: cross-entropy, or PromptSRC's "
                                              "self-regulated loss (MP-PromptSRC; weights 25, 10, 1).")
    frozen_templates: str = option("promptsrc60", "With loss=promptsrc: template set of the frozen text target.")


@dataclass
class Episode:
    """One task at one meta-step: its class prompts, one support batch per inner step, the query batch.

    Inputs are image features when the learner's image side is frozen, else preprocessed images.
    """

    texts: list[str]
    support: list[Batch]
    query: Batch


@dataclass
class EpisodeDraw:
    """One task's draw at one meta-step, before its inputs are fetched: the classes, one
    ``(indices, labels)`` batch per inner step and the query batch."""

    classes: list[int]
    support: list[tuple[list[int], list[int]]]
    query: tuple[list[int], list[int]]


def default_inner_lr(learner: PromptLearner) -> float:
    """The paper's inner rate α: 0.025/6, or 0.02/6 for PromptSRC-style deep prompts (a learner
    with the `deep` capability, as IVLP)."""
    return 0.02 / 6 if learner.capabilities.deep else 0.025 / 6


def clip_gradient(grads: Params, gamma: float) -> tuple[Params, float]:
    """G · γ / max(‖G‖₂, γ) over all tensors together, and the pre-clip norm ‖G‖₂.

    One global norm (not per tensor) so the clipped step keeps G's direction exactly.
    """
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    scale = gamma / max(norm, gamma)
    return {n: g * scale for n, g in grads.items()}, norm


@contextlib.contextmanager
def double_backward_ready(enabled: bool) -> Iterator[None]:
    """Route attention through the math SDPA kernel, the one with a second derivative
    (the fused CPU/CUDA kernels have none), when the outer gradient is second order."""
    if not enabled:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


class TaskInputs:
    """Model inputs of the training images, by dataset index.

    A frozen image side is encoded once (CoOp, CoCoOp); a learned one (IVLP's vision prompts)
    needs the preprocessed images at every step. Unreadable images are found up front and left
    out of every task.
    """

    def __init__(self, learner: PromptLearner, dataset: ImageDataset, num_workers: int):
        self.items = ImageItems(dataset, learner.backbone.preprocess)
        self.device, self.dtype = learner.device, learner.logit_scale.dtype
        self.features: torch.Tensor | None = None
        if learner.image_side_learned:
            self.readable = [i for i in range(len(dataset)) if _readable(dataset, i)]
        else:
            feats, _, skipped = encode_images(learner, dataset, batch_size=64, num_workers=num_workers)
            bad = {s["item"] for s in skipped}
            self.readable = [i for i in range(len(dataset)) if dataset.describe(i) not in bad]
            self.features = feats.clone().to(self.dtype)  # clone: leave inference mode for autograd
            self.row = {i: r for r, i in enumerate(self.readable)}

    def __call__(self, indices: list[int]) -> torch.Tensor:
        if self.features is not None:
            return self.features[torch.as_tensor([self.row[i] for i in indices], device=self.features.device)]
        return torch.stack([self.items[i][0] for i in indices]).to(self.device, self.dtype)


def _readable(dataset: ImageDataset, index: int) -> bool:
    try:
        dataset.load(index)
    except CorruptImageError:
        return False
    return True


class MAMLClip(TrainingMethod):
    """Meta-prompt learning: second-order MAML over class-subset (or dataset) tasks, clipped outer
    gradient, on any learner with trainable parameters; options in `MAMLClipOptions` (the query
    of a task takes its classes' N − K few-shot images beside the K support shots, N = ``--shots``;
    optimizer "sgd" is plain p ← p − β G, to see the clipped step itself)."""

    name = "maml-clip"
    Options = MAMLClipOptions
    lr = 0.001
    episodic = True
    template_options = ("frozen_templates",)

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        c = self.config
        inner_lr = default_inner_lr(learner) if c.inner_lr is None else c.inner_lr
        inner_batch = (8 if learner.conditional else 32) if c.inner_batch is None else c.inner_batch
        query_batch = inner_batch if c.query_batch is None else c.query_batch
        self.options.update(inner_lr=inner_lr, inner_batch=inner_batch, query_batch=query_batch)  # recorded resolved
        _check_options(inner_lr, c.inner_steps, inner_batch, query_batch, c.support_shots, c.task_classes,
                       c.meta_batch, c.clip_norm)
        self.regulated = c.loss == "promptsrc"
        if self.regulated:  # MP-PromptSRC: each task's loss is PromptSRC's, on its own classes
            self.register_buffer("frozen_text", frozen_text_target(learner, self.classnames, c.frozen_templates),
                                 persistent=False)
            self.class_of = {fill_template(c.template, name)[0]: i for i, name in enumerate(self.classnames)}
        self.inner_lr, self.inner_steps, self.clip_norm = inner_lr, c.inner_steps, c.clip_norm
        self.first_order, self.template = c.first_order, c.template

    # --- the learner at other parameter values -------------------------------------------
    def learned(self) -> Params:
        """The meta-prompt p: every trainable tensor of the learner, by name."""
        return {n: p for n, p in self.learner.named_parameters() if p.requires_grad}

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cross-entropy of one batch over `texts` (one prompt per class); an entry point for
        `functional_call`, which runs it at adapted parameters p' instead of the learner's own."""
        learner = self.learner
        feats = learner.encode_images(inputs) if learner.image_side_learned else inputs
        if learner.conditional:
            text = learner.encode_texts(texts, image_features=feats)  # [B, C, D]
            logits = learner.logit_scale * torch.einsum("bd,bcd->bc", feats, text)
        else:
            text = learner.encode_texts(texts)
            logits = learner.logit_scale * feats @ text.T
        if not self.regulated:
            return F.cross_entropy(logits, labels)
        with torch.no_grad():
            frozen = F.normalize(learner.clip.encode_image(inputs), dim=-1) if learner.image_side_learned else inputs
        target = self.frozen_text[torch.as_tensor([self.class_of[t] for t in texts], device=text.device)]
        return self_regulated_loss(logits, labels, text, feats, target, frozen, learner.logit_scale, REGULATION)[0]

    def task_loss(self, point: Params, batch: Batch, texts: list[str]) -> torch.Tensor:
        """The loss of `batch` with the learner's parameters set to `point`."""
        return functional_call(self, {f"learner.{n}": t for n, t in point.items()}, (batch[0], batch[1], texts))

    # --- the mathematics ---------------------------------------------------------------------
    def adapt(self, point: Params, episode: Episode) -> tuple[Params, float]:
        """The inner loop p' = p − α ∇ L(D; p), `inner_steps` times; also the first support loss.

        Second order keeps each inner gradient's graph (create_graph), so ∂p'/∂p includes the
        Hessian terms; first order takes the gradients as constants, so ∂p'/∂p = I.
        """
        losses = []
        for batch in episode.support:
            loss = self.task_loss(point, batch, episode.texts)
            losses.append(loss.item())
            grads = torch.autograd.grad(loss, list(point.values()), create_graph=not self.first_order,
                                        allow_unused=True)
            point = {n: t if g is None else t - self.inner_lr * g for (n, t), g in zip(point.items(), grads)}
        return point, losses[0]

    def meta_gradient(self, episodes: list[Episode]) -> tuple[Params, list[float], list[float]]:
        """G = ∇_p Σ_i L(D'_i; p'_i), one task's graph at a time; also the query and support losses."""
        params = self.learned()
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        query_losses, support_losses = [], []
        with double_backward_ready(not self.first_order):
            for episode in episodes:
                adapted, support_loss = self.adapt(dict(params), episode)
                loss = self.task_loss(adapted, episode.query, episode.texts)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, acc), g in zip(total.items(), grads):
                    if g is not None:
                        acc += g
                query_losses.append(loss.item())
                support_losses.append(support_loss)
        return total, query_losses, support_losses

    def meta_step(self, episodes: list[Episode], optimizer: torch.optim.Optimizer,
                  combine: Callable[[Params, list[float], list[float]], tuple[Params, list[float], list[float]]]
                  | None = None) -> dict[str, Any]:
        """One outer update: the meta-gradient, clipped, handed to the optimiser; its diagnostics.

        `combine` joins the meta-gradient and task losses of this rank's episodes with the other
        ranks' (`episodic_step`) before the clipping; None: this process's are the whole.
        """
        grads, query_losses, support_losses = self.meta_gradient(episodes)
        if combine is not None:
            grads, query_losses, support_losses = combine(grads, query_losses, support_losses)
        clipped, norm = clip_gradient(grads, self.clip_norm)
        if not all(map(math.isfinite, [norm, *query_losses])):  # before the step: the prompt stays good
            raise TrainingDiverged(f"query losses {query_losses}, meta-gradient norm {norm}")
        for n, p in self.learned().items():
            p.grad = clipped[n].to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": sum(query_losses) / len(query_losses), "support_loss": sum(support_losses) / len(support_losses),
                "grad_norm": norm, "clipped": norm > self.clip_norm, "tasks": len(query_losses)}

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam with rate β (the paper), or plain SGD (the update is then exactly β times the clipped G)."""
        params = list(self.learned().values())
        return torch.optim.Adam(params, lr=lr) if self.options["optimizer"] == "adam" else torch.optim.SGD(params, lr=lr)

    # --- episodes ----------------------------------------------------------------------------
    def episode(self, inputs: TaskInputs, classes: list[int], by_class: dict[int, list[int]], rng: random.Random
                ) -> Episode:
        """Draw a task's support/query split and its batches, and fetch their inputs."""
        return self.fetch(inputs, self.draw(classes, by_class, rng))

    def draw(self, classes: list[int], by_class: dict[int, list[int]], rng: random.Random) -> EpisodeDraw:
        """A task's support/query split and its batches, as dataset indices and task labels."""
        split = split_task(classes, by_class, self.options["support_shots"], rng)
        support = draw_batches(split.support, split.support_labels, self.options["inner_batch"], self.inner_steps, rng)
        (query,) = draw_batches(split.query, split.query_labels, self.options["query_batch"], 1, rng)
        return EpisodeDraw(list(classes), support, query)

    def fetch(self, inputs: TaskInputs, draw: EpisodeDraw) -> Episode:
        """The episode of `draw`: its class prompts and the model inputs of its batches."""
        device = self.learner.device

        def batch(indices: list[int], labels: list[int]) -> Batch:
            return inputs(indices), torch.as_tensor(labels, device=device)

        texts = [fill_template(self.template, self.classnames[c])[0] for c in draw.classes]
        return Episode(texts, [batch(i, y) for i, y in draw.support], batch(*draw.query))

    # --- episodic training, driven by the shared loop (`loop.train_episodes`) ---------------
    def start_episodes(self, dataset: ImageDataset, config: TrainConfig) -> tuple[int, int]:
        """Ready the task inputs and the task generator; return meta-steps per epoch and the
        unreadable images left out of every task."""
        self.inputs = TaskInputs(self.learner, dataset, config.num_workers)
        self.by_class = images_by_class(dataset.labels, self.inputs.readable)
        self.sources = list(getattr(dataset, "class_sources", [0] * len(dataset.classnames)))
        task_classes = self.options["task_classes"]
        self.task_classes = (5 if len(set(self.sources)) == 1 else 0) if task_classes is None else task_classes
        self.rng = random.Random(config.seed)
        self.clipped = self.meta_steps = 0
        tasks = len(partition_classes(self.sources, self.task_classes, random.Random(0)))
        return math.ceil(tasks / self.options["meta_batch"]), len(dataset) - len(self.inputs.readable)

    def epoch_steps(self, epoch: int) -> Iterator[list[list[int]]]:
        """Each epoch partitions the training classes into tasks once (every class in one task);
        `meta_batch` tasks per meta-step."""
        tasks = partition_classes(self.sources, self.task_classes, self.rng)
        meta_batch = self.options["meta_batch"]
        for first in range(0, len(tasks), meta_batch):
            yield tasks[first:first + meta_batch]

    def episodic_step(self, tasks: list[list[int]], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """One meta-step over `tasks`: every rank draws every task's episode (so the generators
        stay equal), computes the meta-gradient of its contiguous share, and the shares are
        summed over ranks before clipping (the same G as one process, up to float rounding).

        Raises:
            TrainingDiverged: on a NaN or infinite query loss or meta-gradient, before the step.
        """
        draws = [self.draw(t, self.by_class, self.rng) for t in tasks]
        share = distributed.shard_range(len(draws))
        episodes = [self.fetch(self.inputs, d) for d in draws[share.start:share.stop]]
        record = self.meta_step(episodes, optimizer, combine=self._over_ranks)
        self.meta_steps += 1
        self.clipped += record["clipped"]
        return {**record, "clip_rate": self.clipped / self.meta_steps}

    def _over_ranks(self, grads: Params, query: list[float], support: list[float]
                    ) -> tuple[Params, list[float], list[float]]:
        """The meta-gradient summed over ranks and every rank's task losses, in task order."""
        if distributed.world_size() == 1:
            return grads, query, support
        params = self.learned()
        for n, p in params.items():
            p.grad = grads[n]
        summed = distributed.mean_gradients(list(params.values()))
        parts = distributed.gather((query, support))
        world = distributed.world_size()
        return ({n: g * world for n, g in zip(params, summed)}, [q for part in parts for q in part[0]],
                [s for part in parts for s in part[1]])

    def get_extra_state(self) -> dict[str, Any]:
        """The task generator and the clipping count, for a resumed run (`train_state`)."""
        rng = getattr(self, "rng", None)
        return {"rng": rng.getstate() if rng else None, "clipped": getattr(self, "clipped", 0),
                "meta_steps": getattr(self, "meta_steps", 0)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["rng"] is not None:
            version, internal, gauss = state["rng"]
            self.rng = random.Random()
            self.rng.setstate((version, tuple(internal), gauss))
        self.clipped, self.meta_steps = state["clipped"], state["meta_steps"]


def _check_options(inner_lr: float, inner_steps: int, inner_batch: int, query_batch: int, support_shots: int,
                   task_classes: int | None, meta_batch: int, clip_norm: float) -> None:
    """Refuse settings that cannot train, with the option named."""
    problems = [
        (inner_lr < 0, f"inner_lr must be >= 0, not {inner_lr}"),
        (inner_steps < 1, f"inner_steps must be >= 1, not {inner_steps}"),
        (inner_batch < 0 or query_batch < 0, "inner_batch and query_batch must be >= 0 (0 = the whole set)"),
        (support_shots < 1, f"support_shots must be >= 1, not {support_shots}"),
        (task_classes is not None and (task_classes < 0 or task_classes == 1),
         f"task_classes must be 0 (whole source) or >= 2, not {task_classes}"),
        (meta_batch < 1, f"meta_batch must be >= 1, not {meta_batch}"),
        (not clip_norm > 0, f"clip_norm must be > 0, not {clip_norm}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(f"maml-clip: {message}")
