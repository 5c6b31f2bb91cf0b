"""CoOp (Zhou et al., IJCV 2022): n learned context vectors prepended to every prompt's tokens.

The classic CoOp prompt "a photo of a" + class is, here, the template ``{}.`` with the context
initialised from "a photo of a"; evaluating over many templates prepends the same context to
each. The image side is the plain backbone. As in the reference, the context may be
class-specific (``csc``: one context per class) and the class name may stand at the ``end``
(default), ``middle`` or ``front`` of the context; both need the learner's class names, to know
which class each text names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from ..names import unknown_name_error
from . import text
from .base import PromptLearner
from .checks import check_count, check_text_tower

DEFAULT_CTX_INIT = "a photo of a"
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def initial_context(learner: PromptLearner, n_ctx: int, ctx_init: str | None) -> tuple[nn.Parameter, tuple[int, ...]]:
    """The context parameter ``[n_ctx, W]`` and the fixed tokens that follow it.

    From `ctx_init`'s first n_ctx token embeddings if it has that many tokens, its remaining
    tokens staying fixed text (``_`` read as a space, as the reference does); else N(0, 0.02).
    """
    ids = learner.tokenize([ctx_init]) if ctx_init else None
    return nn.Parameter(text.init_context(learner.clip, ids, n_ctx)), text.fixed_tokens(learner.clip, ids, n_ctx)


class CoOpLearner(PromptLearner):
    """Learned context ``[SOS] ctx_1..ctx_n <text> [EOS]`` on a frozen backbone.

    Args:
        backbone: A CLIP with open_clip's text transformer.
        n_ctx: Number of context vectors (reference default 4).
        ctx_init: Text whose token embeddings initialise the context when it has at least n_ctx
            tokens (its first n_ctx; the rest stay fixed tokens after the context); otherwise, or
            when empty/None, N(0, 0.02).
        csc: Class-specific context: ``ctx`` is ``[C, n_ctx, W]``, one context per class.
        class_token_position: ``end``, ``middle`` or ``front`` (see `text.prepare_classes`).
        classnames: The C classes; needed by ``csc`` and by a position other than ``end``.
    """

    name = "coop"

    def __init__(self, backbone: Backbone, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 csc: bool = False, class_token_position: str = "end", classnames: list[str] | None = None):
        extra = {} if (csc, class_token_position, classnames) == (False, "end", None) else {
            "csc": csc, "class_token_position": class_token_position, "classnames": classnames}
        super().__init__(backbone, n_ctx=n_ctx, ctx_init=ctx_init, **extra)
        check_count(self.name, "n_ctx", n_ctx, low=1)
        check_text_tower(self.name, backbone, n_ctx)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise unknown_name_error("class_token_position", class_token_position, list(CLASS_TOKEN_POSITIONS))
        if (csc or class_token_position != "end") and not classnames:
            raise UserError(f"learner '{self.name}': csc and class_token_position={class_token_position} need the "
                            "class names (option classnames; training fills them from the dataset)")
        self.n_ctx = n_ctx
        self.csc, self.position = bool(csc), class_token_position
        self.classnames = list(classnames) if classnames else None
        self.ctx, self.fixed = initial_context(self, n_ctx, ctx_init)
        if self.csc:
            self.ctx = nn.Parameter(self.ctx.detach().expand(len(self.classnames), -1, -1).clone())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def prepare(self, texts: list[str]) -> text.ContextBatch:
        """The texts laid out for the context: after SOS, or around the class name."""
        if self.classnames is None:
            return text.prepare(self.clip, self.tokenize(texts), self.n_ctx, self.fixed)
        try:
            return text.prepare_classes(self.clip, self.tokenize, texts, self.classnames, self.n_ctx, self.position,
                                        self.fixed)
        except ValueError as err:
            raise UserError(f"learner '{self.name}' ({self.position}, csc={self.csc}): {err}") from None

    def context(self, batch: text.ContextBatch) -> torch.Tensor:
        """The context of each text: shared ``[n, W]``, or ``[M, n, W]`` from each text's class."""
        return self.ctx[batch.classes] if self.csc else self.ctx

    def encode_texts(self, texts: list[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = self.prepare(texts)
        return F.normalize(text.encode(self.clip, batch, [self.context(batch)]), dim=-1)
