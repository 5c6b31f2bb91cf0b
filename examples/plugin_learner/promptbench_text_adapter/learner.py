"""`text-adapter`: a residual bottleneck MLP on the frozen text features (CLIP-Adapter style).

A deliberately small third-party learner showing the whole contract: options declared as a
dataclass (checked and typed by promptbench before any model loads), capabilities for the
training methods, learned tensors as parameters outside the backbone, and the two encoders. It
starts out equal to zero-shot (the adapter's last layer is zero), so training only has to learn
the change it wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptbench_vlm.backbone import Backbone
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import Capabilities, PromptLearner
from promptbench_vlm.options import option


@dataclass(frozen=True)
class TextAdapterOptions:
    """The options of `text-adapter`: ``--learner-opt ratio=0.5``."""

    ratio: float = option(0.2, "Weight of the adapter's output in the residual mix, in [0, 1].")
    reduction: int = option(4, "Bottleneck factor of the adapter MLP (D -> D // reduction -> D).")


class TextAdapterLearner(PromptLearner):
    """Text features ``f`` become ``normalise((1 - ratio) * f + ratio * adapter(f))``.

    No prompt tokens and a frozen image side: `erm` trains it (at CoOp's reference rate);
    methods that need prompt tokens (`promise`) or per-layer prompts (`anprompt`) say so.
    """

    name = "text-adapter"
    Options = TextAdapterOptions
    capabilities = Capabilities(default_lr=0.002)

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)  # checks `options` against TextAdapterOptions: self.config
        ratio, reduction = self.config.ratio, self.config.reduction
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"learner 'text-adapter': ratio must be in [0, 1], got {ratio}")
        if reduction < 1:
            raise UserError(f"learner 'text-adapter': reduction must be >= 1, got {reduction}")
        self.ratio = ratio
        with torch.no_grad():
            dim = self.clip.encode_text(self.tokenize(["a"])).shape[-1]
        hidden = max(1, dim // reduction)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False))
        nn.init.zeros_(self.adapter[2].weight)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        features = F.normalize(self.clip.encode_text(self.tokenize(texts)), dim=-1)
        return F.normalize((1 - self.ratio) * features + self.ratio * self.adapter(features), dim=-1)
