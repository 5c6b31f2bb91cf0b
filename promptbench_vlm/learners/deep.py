"""Shared base of the deep (multi-layer) prompt learners IVLP and MaPLe.

Text side, for prompt depth d >= 1: the context follows SOS at layer 0 (as in CoOp) and, at the
input of each block 1..d-1, positions 1..n are replaced by that layer's learned prompts. Image
side: the subclass says which vision prompts each layer gets (free parameters for IVLP, a
projection of the text prompts for MaPLe); `vision.encode_image` puts them in place. Depth 0 (or
n_ctx 0) leaves a tower exactly as the backbone computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from . import text
from .base import PromptLearner
from .checks import check_count, check_depth, check_text_tower, check_vision_tower
from .coop import initial_context
from .vision import encode_image


MAX_INIT_CTX = 4
"""IVLP/MaPLe use the init phrase for at most this many context tokens (reference ``maple.py``)."""


def random_prompts(n: int, width: int) -> nn.Parameter:
    """Prompt tokens ``[n, width]`` drawn from N(0, 0.02), the reference initialisation."""
    return nn.Parameter(torch.empty(n, width).normal_(std=0.02))


class DeepPromptLearner(PromptLearner):
    """Deep text prompts plus vision prompts that subclasses define.

    Args:
        backbone: A CLIP with open_clip's text transformer and VisionTransformer image tower.
        n_ctx: Text prompt tokens per layer.
        ctx_init: Init text of the layer-0 context for n_ctx <= 4 (see `coop`: its tokens after the
            first n_ctx stay fixed text); deeper layers, and n_ctx > 4, draw N(0, 0.02).
        depth: Text prompt depth: the number of layers, from layer 0, whose input has prompts.
        **options: The subclass's further options, recorded in checkpoints.

    Attributes:
        text_prompts: ``text_prompts[i]`` ``[n_ctx, W]`` are the layer-i text prompts (i < depth).
    """

    image_side_learned = True

    def __init__(self, backbone: Backbone, n_ctx: int, ctx_init: str | None, depth: int, **options: Any):
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=ctx_init, depth=depth, **options)
        check_count(self.name, "n_ctx", n_ctx)
        check_text_tower(self.name, backbone, n_ctx)
        check_vision_tower(self.name, backbone)
        check_depth(self.name, "depth", depth, len(self.clip.transformer.resblocks), "text", n_ctx)
        self.n_ctx = n_ctx if depth else 0
        width = self.clip.transformer.width
        # The reference starts from the init phrase only for n_ctx <= 4, else from "X " * n_ctx.
        first, self.fixed = initial_context(self, n_ctx, ctx_init if n_ctx <= MAX_INIT_CTX else None)
        layers = [first] + [random_prompts(n_ctx, width) for _ in range(depth - 1)]
        self.text_prompts = nn.ParameterList(layers if self.n_ctx else [])
        self.fixed = self.fixed if self.n_ctx else ()  # no context, no init phrase: the plain text

    @property
    def vision_width(self) -> int:
        """Token width of the image transformer."""
        return int(self.clip.visual.transformer.width)

    @property
    def vision_layers(self) -> int:
        """Number of blocks of the image transformer."""
        return len(self.clip.visual.transformer.resblocks)

    def text_layer_prompts(self) -> list[torch.Tensor]:
        """The text prompts of layers 0..depth-1 as `text.encode` takes them (a subclass may add more)."""
        return list(self.text_prompts)

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        """The vision prompts of layers 0..depth_v-1, each ``[n_ctx_v, W_v]``; empty for none."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_image(self.clip.visual, images, self.vision_layer_prompts()), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = text.prepare(self.clip, self.tokenize(texts), self.n_ctx, self.fixed)
        return F.normalize(text.encode(self.clip, batch, self.text_layer_prompts()), dim=-1)
