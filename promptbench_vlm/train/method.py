"""What a training method is: a small object that defines one training step's loss.

The loop, data, optimiser, checkpoints, logging and evaluation are shared (`train.loop`); a
method only says how to turn a batch into a loss (plus its diagnostics), which learner
capabilities it needs, its options and what happens at epoch ends. Methods are found through the
entry-point group `promptbench_vlm.methods`, like learners, so a user can add one
(docs/plugins.md has the whole contract).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..learners.base import PromptLearner
from ..options import NoOptions, parse_given, parse_options
from ..registry import Registry

CAPABILITIES: dict[str, tuple[Callable[[type[PromptLearner]], bool], str]] = {
    "text_tokens": (lambda cls: bool(cls.capabilities.text_tokens),
                    "text-side prompt-token parameters (Capabilities.text_tokens)"),
    "unconditional": (lambda cls: not cls.conditional, "text features that do not depend on the image "
                      "(conditional = False)"),
    "image_side_learned": (lambda cls: cls.image_side_learned, "a learned image side (image_side_learned = True)"),
    "layer_prompts": (lambda cls: cls.capabilities.layer_prompts,
                      "towers built from per-layer prompts (Capabilities.layer_prompts)"),
}
"""The learner capabilities a method may require (`TrainingMethod.requires`): a test on the
learner class and what it means, for the message when one is missing."""


class TrainingMethod(nn.Module):
    """Base class of training methods.

    Attributes:
        name: Registry name (``"erm"``).
        Options: The declared options, a dataclass of `options.option` fields (`NoOptions`: none);
            the constructor checks what it is given against it and keeps the typed result as
            `config` and its dict as `options` (recorded in the checkpoint and result).
        requires: Names of the learner capabilities the method needs (keys of `CAPABILITIES`);
            any learner with trainable parameters that has them fits.
        lr: The method's own default peak learning rate; None uses the learner's reference rate
            (`Capabilities.default_lr`). See `default_lr`.
        learner_defaults: Per learner name, the learner options the method's reference configs
            use where they differ from the learner's own defaults (PromptSRC: 4 + 4 IVLP tokens);
            options the user gives win.
        template_options: Options naming a template set the method trains on; under the wording
            protocol (`wordings`) the run sets each of them to the seen pool, so no method
            trains on a held-out wording.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    lr: ClassVar[float | None] = None
    learner_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    template_options: ClassVar[tuple[str, ...]] = ()
    optimizer: ClassVar[str | None] = None
    """The shared loop's optimiser when the method defines it (Promise: its meta-update is an SGD
    step); None: the learner's reference one (`Capabilities.optimizer`)."""

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__()
        missing = self.missing(type(learner))
        if missing:
            raise UserError(f"method '{self.name}' cannot train learner '{learner.name}': it lacks the capability "
                            f"'{missing[0]}' ({CAPABILITIES[missing[0]][1]})")
        if not any(p.requires_grad for p in learner.parameters()):
            raise UserError(f"learner '{learner.name}' has no trainable parameters; nothing for '{self.name}' to train")
        self.learner = learner
        self.classnames = list(classnames)
        self.config = parse_options(f"method '{self.name}'", type(self).Options, options)
        self.options: dict[str, Any] = asdict(self.config)

    @classmethod
    def missing(cls, learner: type[PromptLearner]) -> list[str]:
        """The required capabilities that learner class `learner` lacks (empty: it fits)."""
        return [name for name in cls.requires if not CAPABILITIES[name][0](learner)]

    def default_lr(self) -> float:
        """The peak learning rate when none is given: the method's `lr`, else the learner's."""
        return self.lr if self.lr is not None else self.learner.capabilities.default_lr

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

    def build_optimizer(self, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        """The shared loop's optimiser over `trainable_parameters`: SGD with momentum, or AdamW
        (its default betas) where the method or else the learner's reference asks for it."""
        params = self.trainable_parameters()
        if (self.optimizer or self.learner.capabilities.optimizer) == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def plus_learner_loss(self, loss: torch.Tensor, diagnostics: dict[str, float], images: torch.Tensor,
                          labels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` plus the learner's own term (`PromptLearner.extra_loss`, e.g. MMRL's
        regularisation) on this batch and the class `texts` of the method's template."""
        extra = self.learner.extra_loss(images, labels, texts)
        if extra is None:
            return loss, diagnostics
        term, more = extra
        return loss + term, {**diagnostics, **more, "learner_loss": term.item()}

    def image_features(self, images: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """The learner's image features, from the precomputed cache when the image side is frozen."""
        return image_features if image_features is not None else self.learner.encode_images(images)

    episodic: ClassVar[bool] = False
    """True for a method whose step is a meta-step over tasks, not one loss per batch (MAML's
    episodes): the shared loop then drives its episodic step protocol (`loop.train_episodes`:
    ``start_episodes``, ``epoch_steps``, ``episodic_step``, ``make_optimizer``), with the same
    step log, hooks, ``--resume`` state and torchrun ranks as every other method."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Hook after each epoch (PromptSRC's prompt aggregation uses it)."""

    def finish(self) -> None:
        """Hook after the last epoch, before the checkpoint is written."""

    def summary(self) -> dict[str, Any]:
        """What the trained method's own state says, for the run's result (Promise: its template
        weights); empty by default."""
        return {}


METHODS: Registry[type[TrainingMethod]] = Registry("promptbench_vlm.methods", "method")


def check_method_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` of method `name` checked against its declaration and typed (only the keys given),
    before any model loads.

    Raises:
        UserError: unknown method, unknown option (with "did you mean") or a value of the wrong type.
    """
    return parse_given(f"method '{name}'", METHODS.get(name).Options, options)


def build_method(name: str, learner: PromptLearner, classnames: list[str], options: dict[str, Any] | None = None
                 ) -> TrainingMethod:
    """Instantiate the registered method `name` for `learner`.

    Raises:
        UserError: a bad option, a learner without a capability the method needs, or a TypeError
            inside the method's own code (named with the method and the place it was raised).
    """
    cls = METHODS.get(name)
    try:
        return cls(learner, classnames, **(options or {})).to(learner.device)
    except TypeError as err:
        raise METHODS.raised_inside(name, err) from err
