"""ERM baselines: cross-entropy on one training template (CoOp, CoCoOp, IVLP, MaPLe training), and
the multi-template control: the same cross-entropy averaged over wordings drawn from a set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..learners.base import PromptLearner
from ..options import option
from ..perturb import fill_template
from ..templates import load_templates
from .method import TrainingMethod


@dataclass(frozen=True)
class ERMOptions:
    """Options of `erm` (and the methods built on it)."""

    template: str = option("{}.", "The training template ({} = class name).")


class ERM(TrainingMethod):
    """Cross-entropy of the learner's logits with one template (default ``{}.``: the learned
    context, initialised from "a photo of a", stands in for the hand-written words). Any learner
    with trainable parameters; the default rate is the learner's reference one."""

    name = "erm"
    Options = ERMOptions

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        self.texts = [fill_template(self.config.template, c)[0] for c in classnames]

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
        diagnostics = {"acc": (logits.argmax(1) == labels).float().mean().item() * 100}
        return self.plus_learner_loss(loss, diagnostics, images, labels, self.texts)


@dataclass(frozen=True)
class MultiTemplateOptions(ERMOptions):
    """Options of `erm-multi`."""

    templates: str = option("promptsrc60", "Template set the wordings are drawn from.")
    templates_per_step: int = option(10, "Wordings per step; 0 = every template of the set each step.")


class MultiTemplateERM(ERM):
    """ERM on many wordings: each step draws `templates_per_step` templates of the set without
    replacement and averages the cross-entropy over them (one batched text forward).

    The control every robust method is measured against: it trains on the same wordings as
    Promise (the seen pool under the wording protocol), with no meta-learning, weighting or
    per-token rates, so what a method adds beyond it is its own (docs/methods.md). Drawing a
    subset per step rather than averaging all of them keeps a step's cost near Promise's P_in
    pass; the draw uses the torch generator the shared loop seeds and checkpoints, so runs
    repeat and resume exactly. Options in `MultiTemplateOptions`.
    """

    name = "erm-multi"
    Options = MultiTemplateOptions
    template_options = ("templates",)

    def __init__(self, learner: PromptLearner, classnames: list[str], **options: Any):
        super().__init__(learner, classnames, **options)
        templates, templates_per_step = self.config.templates, self.config.templates_per_step
        pool = load_templates(templates).templates
        if not 0 <= templates_per_step <= len(pool):
            raise UserError(f"erm-multi: templates_per_step must be between 0 and the {len(pool)} templates of "
                            f"'{templates}', got {templates_per_step}")
        self.per_step = templates_per_step or len(pool)
        self.pool_texts = [[fill_template(t, c)[0] for c in classnames] for t in pool]

    def loss(self, images, labels, image_features=None):
        feats = self.image_features(images, image_features)
        drawn = torch.randperm(len(self.pool_texts))[:self.per_step].tolist()
        texts = [text for t in drawn for text in self.pool_texts[t]]
        n_classes = len(self.classnames)
        if self.learner.conditional:
            text = self.learner.encode_texts(texts, image_features=feats)  # [B, k*C, D]
            logits = torch.einsum("bd,bkd->bk", feats, text).view(len(feats), len(drawn), n_classes).transpose(0, 1)
        else:
            text = self.learner.encode_texts(texts).view(len(drawn), n_classes, -1)  # [k, C, D]
            logits = torch.einsum("bd,kcd->kbc", feats, text)
        logits = self.learner.logit_scale * logits  # [k, B, C]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(drawn)))
        diagnostics = {"acc": (logits.argmax(-1) == labels).float().mean().item() * 100}
        return self.plus_learner_loss(loss, diagnostics, images, labels, self.pool_texts[drawn[0]])
