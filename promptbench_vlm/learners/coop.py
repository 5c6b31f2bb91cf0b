"""CoOp (Zhou et al., IJCV 2022): n learned context vectors prepended to every prompt's tokens.

The classic CoOp prompt "a photo of a" + class is, here, the template ``{}.`` with the context
initialised from "a photo of a"; evaluating over many templates prepends the same context to
each. The image side is the plain backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from . import text
from .base import PromptLearner
from .checks import check_count, check_text_tower

DEFAULT_CTX_INIT = "a photo of a"


def initial_context(learner: PromptLearner, n_ctx: int, ctx_init: str | None) -> nn.Parameter:
    """The context parameter ``[n_ctx, W]``: from `ctx_init`'s embeddings if it has >= n_ctx tokens."""
    ids = learner.tokenize([ctx_init]) if ctx_init else None
    return nn.Parameter(text.init_context(learner.clip, ids, n_ctx))


class CoOpLearner(PromptLearner):
    """Learned context ``[SOS] ctx_1..ctx_n <text> [EOS]`` on a frozen backbone.

    Args:
        backbone: A CLIP with open_clip's text transformer.
        n_ctx: Number of context vectors (reference default 4).
        ctx_init: Text whose token embeddings initialise the context when it has at least n_ctx
            tokens (its first n_ctx); otherwise, or when empty/None, N(0, 0.02).
    """

    name = "coop"

    def __init__(self, backbone: Backbone, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT):
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=ctx_init)
        check_count(self.name, "n_ctx", n_ctx, low=1)
        check_text_tower(self.name, backbone, n_ctx)
        self.n_ctx = n_ctx
        self.ctx = initial_context(self, n_ctx, ctx_init)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = text.prepare(self.clip, self.tokenize(texts), self.n_ctx)
        return F.normalize(text.encode(self.clip, batch, [self.ctx]), dim=-1)
