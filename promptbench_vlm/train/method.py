"""What a training method is: a small object that defines one training step's loss.

The loop, data, optimiser, checkpoints, logging and evaluation are shared (`train.loop`); a
method only says how to turn a batch into a loss (plus its diagnostics), which learners it fits,
and what happens at epoch ends. Methods are found through the entry-point group
`promptbench_vlm.methods`, like learners, so a user can add one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..learners.base import PromptLearner
from ..registry import Registry


class TrainingMethod(nn.Module):
    """Base class of training methods.

    Attributes:
        name: Registry name (``"erm"``).
        learners: Learner names the method fits; None means any learner with trainable params.
        lr: The method's default learning rate (the reference code's), used when none is given.
        learner_defaults: Per learner name, the learner options the method's reference configs
            use where they differ from the learner's own defaults (PromptSRC: 4 + 4 IVLP tokens);
            options the user gives win.
        template_options: Options naming a template set the method trains on; under the wording
            protocol (`wordings`) the run sets each of them to the seen pool, so no method
            trains on a held-out wording.
    """

    name: ClassVar[str] = ""
    learners: ClassVar[tuple[str, ...] | None] = None
    lr: ClassVar[float] = 0.002
    learner_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    template_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__()
        if self.learners is not None and learner.name not in self.learners:
            raise UserError(
                f"method '{self.name}' does not fit learner '{learner.name}'; it needs one of: {', '.join(self.learners)}"
            )
        if not any(p.requires_grad for p in learner.parameters()):
            raise UserError(f"learner '{learner.name}' has no trainable parameters; nothing for '{self.name}' to train")
        self.learner = learner
        self.classnames = list(classnames)
        self.options: dict[str, Any] = dict(options)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimiser updates: the learner's prompts and the method's own parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    def loss(self, images: torch.Tensor, labels: torch.Tensor, image_features: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch and diagnostics to log.

        Args:
            images: Preprocessed images ``[B, 3, H, W]``.
            labels: Class indices ``[B]`` into `classnames`.
            image_features: Precomputed features when the learner's image side is frozen, else None.
        """
        raise NotImplementedError

    def image_features(self, images: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """The learner's image features, from the precomputed cache when the image side is frozen."""
        return image_features if image_features is not None else self.learner.encode_images(images)

    fit = None
    """Optional replacement of the shared loop: a method that is not "one loss per batch" (MAML's
    episodes) defines ``fit(dataset, config, lr, log_path, on_epoch_end, progress) -> TrainOutcome``
    with the meaning of `train.loop.train`'s arguments, and `run_training` calls it instead."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Hook after each epoch (PromptSRC's prompt aggregation uses it)."""

    def finish(self) -> None:
        """Hook after the last epoch, before the checkpoint is written."""


METHODS: Registry[type[TrainingMethod]] = Registry("promptbench_vlm.methods", "method")


def build_method(name: str, learner: PromptLearner, classnames: list[str], options: dict[str, Any] | None = None
                 ) -> TrainingMethod:
    """Instantiate the registered method `name` for `learner`."""
    cls = METHODS.get(name)
    try:
        return cls(learner, classnames, **(options or {})).to(learner.device)
    except TypeError as err:
        raise UserError(f"method '{name}': bad options {options}: {err}") from None
