"""ERM baselines: cross-entropy on one training template (CoOp, CoCoOp, IVLP, MaPLe training)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..learners.base import PromptLearner
from ..perturb import fill_template
from .method import TrainingMethod

DEEP_LEARNERS = ("ivlp", "maple", "anprompt-ivlp", "anprompt-maple")


class ERM(TrainingMethod):
    """Cross-entropy of the learner's logits with one template (default ``{}.``: the learned
    context, initialised from "a photo of a", stands in for the hand-written words).

    Options:
        template: The training template.
    """

    name = "erm"

    def __init__(self, learner: PromptLearner, classnames: list[str], template: str = "{}.", **options: Any):
        super().__init__(learner, classnames, template=template, **options)
        self.texts = [fill_template(template, c)[0] for c in classnames]

    @classmethod
    def default_lr(cls, learner_name: str) -> float:
        """The reference code's rate: 0.0035 for MaPLe/IVLP, 0.002 for CoOp-style learners."""
        return 0.0035 if learner_name in DEEP_LEARNERS else 0.002

    def logits(self, image_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, C]`` of the training template, and the class text features used."""
        if self.learner.conditional:
            text = self.learner.encode_texts(self.texts, image_features=image_feats)  # [B, C, D]
            return self.learner.logit_scale * torch.einsum("bd,bcd->bc", image_feats, text), text
        text = self.learner.encode_texts(self.texts)  # [C, D]
        return self.learner.logit_scale * image_feats @ text.T, text

    def loss(self, images, labels, image_features=None):
        logits, _ = self.logits(self.image_features(images, image_features))
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": (logits.argmax(1) == labels).float().mean().item() * 100}
