"""`text-adapter`: a residual bottleneck MLP on the frozen text features (CLIP-Adapter style).

A deliberately small third-party learner showing the whole contract: options as keyword
arguments, learned tensors as parameters outside the backbone, and the two encoders. It starts
out equal to zero-shot (the adapter's last layer is zero), so training only has to learn the
change it wants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptbench_vlm.backbone import Backbone
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import PromptLearner


class TextAdapterLearner(PromptLearner):
    """Text features ``f`` become ``normalise((1 - ratio) * f + ratio * adapter(f))``.

    Args:
        backbone: Any open_clip backbone (the frozen model is used as is).
        ratio: Weight of the adapter's output in the residual mix, in [0, 1].
        reduction: Bottleneck factor of the adapter MLP (``D -> D // reduction -> D``).
    """

    name = "text-adapter"

    def __init__(self, backbone: Backbone, ratio: float = 0.2, reduction: int = 4):
        # Pass every option, defaults included, so a checkpoint rebuilds this exact learner.
        super().__init__(backbone, ratio=ratio, reduction=reduction)
        if not 0.0 <= ratio <= 1.0:
            raise UserError(f"learner 'text-adapter': ratio must be in [0, 1], got {ratio}")
        if not isinstance(reduction, int) or reduction < 1:
            raise UserError(f"learner 'text-adapter': reduction must be an integer >= 1, got {reduction!r}")
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
