"""IVLP, independent vision-language prompting (the MaPLe paper's baseline, PromptSRC's learner).

Deep text prompts (see `deep`) and, independently, free deep vision prompts: ``n_ctx_v`` tokens
appended to the ViT input before ``ln_pre`` and replaced at the input of each block < depth_v.
Reference defaults: depth 9 on both towers, 2 + 2 tokens (PromptSRC uses 4 + 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbone import Backbone
from ..options import option
from .base import Capabilities
from .checks import check_count, check_depth, default_depth
from .deep import DEEP_LR, DeepOptions, DeepPromptLearner, random_prompts


@dataclass(frozen=True)
class IVLPOptions(DeepOptions):
    """Options of `ivlp`: the deep text prompts' and the free vision prompts'."""

    n_ctx_v: int = option(2, "Vision prompt tokens per layer; 0 leaves the image tower plain.")
    depth_v: int | None = option(None, "Vision prompt depth; none: 9, capped at the image tower's layers.")


class IVLPLearner(DeepPromptLearner):
    """Independent deep prompts on both towers.

    Args:
        backbone: A CLIP with open_clip's text transformer and VisionTransformer image tower.
        n_ctx: Text prompt tokens per layer (default 2).
        ctx_init: Init text of the layer-0 text context (default "a photo of a").
        depth: Text prompt depth (default 9, capped at the text tower's layers; 0 leaves it plain).
        n_ctx_v: Vision prompt tokens per layer (default 2; 0 leaves the image tower plain).
        depth_v: Vision prompt depth (default 9, capped at the image tower's layers; 0 leaves it plain).

    Attributes:
        vision_prompts: ``vision_prompts[i]`` ``[n_ctx_v, W_v]`` are the layer-i vision prompts.
    """

    name = "ivlp"
    Options = IVLPOptions
    capabilities = Capabilities(text_tokens=("text_prompts.",), vision_tokens=("vision_prompts.",),
                                layer_prompts=True, deep=True, default_lr=DEEP_LR, anti_noise="anprompt-ivlp")

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        n_ctx_v = self.config.n_ctx_v
        depth_v = self.options["depth_v"] = default_depth(self.config.depth_v, self.clip.visual.transformer)
        check_count(self.name, "n_ctx_v", n_ctx_v)
        check_depth(self.name, "depth_v", depth_v, self.vision_layers, "image", n_ctx_v)
        count = depth_v if n_ctx_v else 0
        self.vision_prompts = nn.ParameterList([random_prompts(n_ctx_v, self.vision_width) for _ in range(count)])

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return list(self.vision_prompts)
