"""Shared base of the deep (multi-layer) prompt learners IVLP and MaPLe.

Text side, for prompt depth d >= 1: the context follows SOS at layer 0 (as in CoOp) and, at the
input of each block 1..d-1, positions 1..n are replaced by that layer's learned prompts. Image
side: the subclass says which vision prompts each layer gets (free parameters for IVLP, a
projection of the text prompts for MaPLe); `vision.encode_image` puts them in place. Depth 0 (or
n_ctx 0) leaves a tower exactly as the backbone computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..options import option
from . import text
from .base import PromptLearner
from .checks import check_count, check_depth, check_text_tower, check_vision_tower, default_depth
from .coop import DEFAULT_CTX_INIT, initial_context
from .vision import encode_image

DEEP_LR = 0.0035
"""The reference peak rate of MaPLe and IVLP (0.002 for CoOp-style learners)."""


@dataclass(frozen=True)
class DeepOptions:
    """Options of the deep-prompt learners (MaPLe's; IVLP adds the vision ones)."""

    n_ctx: int = option(2, "Prompt tokens per layer.")
    ctx_init: str | None = option(DEFAULT_CTX_INIT, "Init text of the layer-0 text prompts for n_ctx <= 4 (its tokens "
                                  "after the first n_ctx stay fixed text); deeper layers, n_ctx > 4 and empty/none "
                                  "draw N(0, 0.02).")
    depth: int | None = option(None, "Prompt depth: layers from layer 0 whose input has prompts; none: 9, capped "
                               "at the tower's layers; 0 leaves the backbone plain.")


MAX_INIT_CTX = 4
"""IVLP/MaPLe use the init phrase for at most this many context tokens (reference ``maple.py``)."""


def random_prompts(n: int, width: int) -> nn.Parameter:
    """Prompt tokens ``[n, width]`` drawn from N(0, 0.02), the reference initialisation."""
    return nn.Parameter(torch.empty(n, width).normal_(std=0.02))


class DeepPromptLearner(PromptLearner):
    """Deep text prompts plus vision prompts that subclasses define.

    Options (`DeepOptions` and a subclass's own): n_ctx text prompt tokens per layer; ctx_init,
    the init text of the layer-0 context for n_ctx <= 4 (see `coop`; deeper layers draw N(0, 0.02)); depth, the
    text prompt depth (the number of layers, from layer 0, whose input has prompts), resolved by
    `depth_towers` when not given and recorded resolved.

    Attributes:
        text_prompts: ``text_prompts[i]`` ``[n_ctx, W]`` are the layer-i text prompts (i < depth).
    """

    image_side_learned = True
    Options = DeepOptions

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        n_ctx, ctx_init = self.config.n_ctx, self.config.ctx_init
        depth = self.options["depth"] = default_depth(self.config.depth, *self.depth_towers())
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

    def depth_towers(self) -> Sequence[Any]:
        """The transformers whose layer count caps the default depth (the text one)."""
        return [getattr(self.clip, "transformer", None)]

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
