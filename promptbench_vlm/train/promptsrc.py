"""PromptSRC: ERM on IVLP plus self-regulation towards the frozen model and Gaussian aggregation.

Follows the PromptSRC reference code (``trainers/promptsrc.py`` and its base-to-new config
``vit_b16_c2_ep20_batch4_4+4ctx.yaml``): L1 between prompted and frozen text features (the frozen
target is, per class, the mean over the 60 templates of the frozen backbone's raw text features,
normalised after averaging), L1 between prompted and frozen image features, KL(zero-shot ||
prompted) on logits, and Gaussian prompt aggregation (GPA) of the per-epoch prompt weights with
the config's mean 15 and std 1 (in epochs, not rescaled: the cross-dataset and few-shot configs
have their own, see the presets). The learner is IVLP with 4 + 4 tokens at depth 9, rate 0.0025.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..learners.base import PromptLearner
from ..options import option
from ..perturb import fill_template
from ..templates import load_templates
from .erm import ERM, ERMOptions


@dataclass(frozen=True)
class PromptSRCOptions(ERMOptions):
    """Options of `promptsrc`: ERM's template and the self-regulation."""

    text_weight: float = option(25.0, "Weight of the text L1 self-regulation.")
    image_weight: float = option(10.0, "Weight of the image L1 self-regulation.")
    kl_weight: float = option(1.0, "Weight of KL(zero-shot || prompted).")
    gpa: bool = option(True, "Gaussian prompt aggregation of the per-epoch prompts.")
    gpa_mean: float | None = option(None, "GPA mean, in epochs; none: 15, the base-to-new config's (of 20 epochs).")
    gpa_std: float | None = option(None, "GPA std, in epochs; none: 1, the base-to-new config's.")
    frozen_templates: str = option("promptsrc60", "Template set averaged into the frozen text target.")


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weight of each epoch (1-based): a Gaussian density, normalised to sum 1."""
    raw = [math.exp(-((e - mean) ** 2) / (2 * std**2)) for e in range(1, epochs + 1)]
    total = sum(raw)
    return [w / total for w in raw]


@torch.no_grad()
def frozen_text_target(learner: PromptLearner, classnames: list[str], templates: str) -> torch.Tensor:
    """Per class ``[C, D]``: the mean over the template set's prompts of the frozen backbone's
    raw text features, normalised after averaging (the reference's ``fixed_embeddings``)."""
    feats = []
    for classname in classnames:
        ids = learner.tokenize([fill_template(t, classname)[0] for t in load_templates(templates).templates])
        feats.append(learner.clip.encode_text(ids).mean(0))
    return F.normalize(torch.stack(feats), dim=-1)


def self_regulated_loss(logits: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, image: torch.Tensor,
                        frozen_text: torch.Tensor, frozen_image: torch.Tensor, logit_scale: torch.Tensor,
                        weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """PromptSRC's loss: CE + L1(text, frozen text) + L1(image, frozen image) + KL(zero-shot || prompted).

    Args:
        logits: Prompted logits ``[B, C]``.
        labels: ``[B]``.
        text: Prompted normalised class text features ``[C, D]`` (or per image ``[B, C, D]``).
        image: Prompted normalised image features ``[B, D]``.
        frozen_text: The frozen target ``[C, D]`` of the same classes.
        frozen_image: The frozen backbone's normalised image features ``[B, D]``.
        logit_scale: CLIP's temperature, exp'd.
        weights: ``text``, ``image`` and ``kl`` weights (the reference's 25, 10, 1).

    Returns:
        The loss and its terms (and the batch accuracy) for the log.
    """
    zero_shot = logit_scale * frozen_image @ frozen_text.T
    ce = F.cross_entropy(logits, labels)
    l_text = (text - frozen_text).abs().mean() * weights["text"]
    l_image = (image - frozen_image).abs().mean() * weights["image"]
    l_kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zero_shot, 1), reduction="sum", log_target=True)
    l_kl = l_kl / logits.numel() * weights["kl"]
    loss = ce + l_text + l_image + l_kl
    return loss, {"ce": ce.item(), "l1_text": l_text.item(), "l1_image": l_image.item(), "kl": l_kl.item(),
                  "acc": (logits.argmax(1) == labels).float().mean().item() * 100}


class PromptSRC(ERM):
    """PromptSRC's losses on a learner with a learned image side (the paper's IVLP; MaPLe fits
    too), options in `PromptSRCOptions`; the reference configs' IVLP has 4 + 4 tokens
    (`learner_defaults`) and rate 0.0025."""

    name = "promptsrc"
    Options = PromptSRCOptions
    requires = ("image_side_learned",)
    lr = 0.0025
    learner_defaults = {"ivlp": {"n_ctx": 4, "n_ctx_v": 4}}
    template_options = ("frozen_templates",)
    GPA_MEAN, GPA_STD = 15.0, 1.0

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        c = self.config
        self.weights = {"text": c.text_weight, "image": c.image_weight, "kl": c.kl_weight}
        self.gpa = c.gpa
        self.gpa_mean, self.gpa_std = c.gpa_mean, c.gpa_std
        self.register_buffer("frozen_text", frozen_text_target(learner, self.classnames, c.frozen_templates),
                             persistent=False)
        self._aggregate: dict[str, torch.Tensor] = {}

    def loss(self, images, labels, image_features=None):
        image_feats = self.learner.encode_images(images)
        logits, text = self.logits(image_feats)
        with torch.no_grad():
            frozen_image = F.normalize(self.learner.clip.encode_image(images), dim=-1)
        return self_regulated_loss(logits, labels, text, image_feats, self.frozen_text, frozen_image,
                                   self.learner.logit_scale, self.weights)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Add this epoch's prompt weights to the Gaussian-weighted aggregate."""
        if not self.gpa:
            return
        mean = self.gpa_mean if self.gpa_mean is not None else self.GPA_MEAN
        std = self.gpa_std if self.gpa_std is not None else self.GPA_STD
        weight = gaussian_epoch_weights(epochs, mean, std)[epoch - 1]
        for key, value in self.learner.learned_state().items():
            self._aggregate[key] = self._aggregate.get(key, torch.zeros_like(value)) + weight * value

    def finish(self) -> None:
        """Replace the prompts by their Gaussian-weighted average over epochs."""
        if self.gpa and self._aggregate:
            self.learner.load_learned_state(self._aggregate, "GPA aggregate")

    def get_extra_state(self) -> dict[str, Any]:
        """The aggregate so far, in `state_dict`, so that a resumed run (`train_state`) keeps it."""
        return {"aggregate": dict(self._aggregate)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._aggregate = dict(state["aggregate"])
