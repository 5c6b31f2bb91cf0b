"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a small meta-net.

For image features f (the L2-normalised output of `encode_images`), every context vector becomes
``ctx_i + meta_net(f)`` with ``meta_net = Linear(D, D // 16) -> ReLU -> Linear(D // 16, W)``, as in
the reference code. Text features therefore depend on the image: the learner is `conditional`
and `encode_texts` needs the image features, returning ``[N, M, D]``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from . import text
from .base import Capabilities
from .coop import ContextOptions, CoOpLearner


class CoCoOpLearner(CoOpLearner):
    """Image-conditional context on a frozen backbone.

    Args:
        backbone: A CLIP with open_clip's text transformer.
        n_ctx: Number of context vectors (reference default 4).
        ctx_init: As for `coop`: init text of the context, else N(0, 0.02).
    """

    name = "cocoop"
    conditional = True
    Options = ContextOptions
    capabilities = Capabilities(text_tokens=("ctx",))

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        dim = text.text_feature_dim(self.clip)
        hidden = max(1, dim // 16)
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, hidden),
                relu=nn.ReLU(),
                linear2=nn.Linear(hidden, self.ctx.shape[1]),
            )
        )

    def layout(self) -> tuple[bool, str, None]:
        """CoCoOp has the shared context only (the reference has no class-aware layouts)."""
        return False, "end", None

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``[N, M, D]`` L2-normalised features: the M prompts as conditioned on each image.

        Raises:
            ValueError: no `image_features` (a conditional learner cannot encode text alone).
        """
        if image_features is None:
            raise ValueError("cocoop is image-conditional: encode_texts needs image_features [N, D]")
        batch = text.prepare(self.clip, self.tokenize(texts), self.n_ctx, self.fixed)
        contexts = self.ctx + self.meta_net(image_features.to(self.ctx.dtype))[:, None, :]
        features = torch.stack([text.encode(self.clip, batch, [ctx]) for ctx in contexts])
        return F.normalize(features, dim=-1)
