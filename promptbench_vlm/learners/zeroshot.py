"""The zero-shot learner: the plain backbone, nothing learned. The reference every method beats."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PromptLearner


class ZeroShotLearner(PromptLearner):
    """Encodes prompts and images with the frozen backbone as is."""

    name = "zeroshot"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.tokenize(texts)), dim=-1)
