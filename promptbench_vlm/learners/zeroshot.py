"""The zero-shot learner: the plain backbone, nothing learned. The reference every method beats."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import text
from .base import PromptLearner
from .checks import check_text_tower


class ZeroShotLearner(PromptLearner):
    """Encodes prompts and images with the frozen backbone as is.

    On open_clip's own causal text transformer, texts go through the context learners' forward
    with no context (the same features as ``CLIP.encode_text``), which stops at the batch's last
    EOS instead of running the padding; any other text tower uses ``encode_text``.
    """

    name = "zeroshot"

    def __init__(self, backbone: Any, **options: Any):
        super().__init__(backbone, **options)  # declares no options: any given is refused
        try:
            check_text_tower(self.name, backbone, n_ctx=0)
            self.short_text_forward = self.clip.attn_mask is not None
        except UserError:
            self.short_text_forward = False

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.tokenize(texts)
        if self.short_text_forward:
            return F.normalize(text.encode(self.clip, text.prepare(self.clip, ids, 0), []), dim=-1)
        return F.normalize(self.clip.encode_text(ids), dim=-1)
