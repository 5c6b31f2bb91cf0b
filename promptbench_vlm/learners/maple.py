"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts coupled from the text side.

Deep text prompts as in IVLP; the vision prompts are not free: at each layer i < depth they are
``Linear_i(text prompts of layer i)``, one ``Linear(text width -> vision width)`` per layer, so
the image features move with the text context. The deep layers' maps start as copies of one
draw, as in the reference. Reference defaults: depth 9, n_ctx 2.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backbone import Backbone
from .base import Capabilities
from .checks import check_depth
from .deep import DEEP_LR, DeepPromptLearner


class MaPLeLearner(DeepPromptLearner):
    """Text prompts on every layer < depth, projected into the image tower.

    Args:
        backbone: A CLIP with open_clip's text transformer and VisionTransformer image tower.
        n_ctx: Prompt tokens per layer on both towers (default 2).
        ctx_init: Init text of the layer-0 text context (default "a photo of a").
        depth: Prompt depth of both towers (default 9, capped at the towers' layers; 0 leaves the
            backbone plain).

    Attributes:
        vision_proj: ``vision_proj[i]`` maps the layer-i text prompts to the layer-i vision prompts.
    """

    name = "maple"
    capabilities = Capabilities(text_tokens=("text_prompts.",), layer_prompts=True, deep=True, default_lr=DEEP_LR,
                                anti_noise="anprompt-maple")

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        check_depth(self.name, "depth", self.options["depth"], self.vision_layers, "image", self.config.n_ctx)
        width = self.clip.transformer.width
        # As the reference: the layer-0 projection is drawn on its own, the deeper ones are copies
        # of one draw, so every deep layer starts from the same map.
        deep = nn.Linear(width, self.vision_width)
        self.vision_proj = nn.ModuleList([nn.Linear(width, self.vision_width), *(
            copy.deepcopy(deep) for _ in self.text_prompts[1:])][: len(self.text_prompts)])

    def depth_towers(self) -> Sequence[Any]:
        """Both towers: MaPLe's one depth applies to each."""
        return [*super().depth_towers(), getattr(getattr(self.clip, "visual", None), "transformer", None)]

    def vision_layer_prompts(self) -> list[torch.Tensor]:
        return [proj(prompts) for proj, prompts in zip(self.vision_proj, self.text_prompts)]
