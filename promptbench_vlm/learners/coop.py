"""CoOp (Zhou et al., IJCV 2022): n learned context vectors prepended to every prompt's tokens.

The classic CoOp prompt "a photo of a" + class is, here, the template ``{}.`` with the context
initialised from "a photo of a"; evaluating over many templates prepends the same context to
each. The image side is the plain backbone. As in the reference, the context may be
class-specific (``csc``: one context per class) and the class name may stand at the ``end``
(default), ``middle`` or ``front`` of the context; both need the learner's class names, to know
which class each text names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from ..options import option
from . import text
from .base import Capabilities, PromptLearner
from .checks import check_count, check_text_tower

DEFAULT_CTX_INIT = "a photo of a"


@dataclass(frozen=True)
class ContextOptions:
    """The context options of `coop` and `cocoop`."""

    n_ctx: int = option(4, "Number of learned context vectors.")
    ctx_init: str | None = option(DEFAULT_CTX_INIT, "Text whose first n_ctx token embeddings initialise the context "
                                  "(the rest stay fixed tokens after it); shorter, empty or none: N(0, 0.02).")


@dataclass(frozen=True)
class CoOpOptions(ContextOptions):
    """Options of `coop`: the context's and the reference's class-aware layouts."""

    csc: bool = option(False, "Class-specific context: one context per class.")
    class_token_position: Literal["end", "middle", "front"] = option("end", "Where the class name stands relative to "
                                                                     "the context.")
    classnames: list[str] | None = option(None, "The classes, needed by csc and by a position other than end "
                                          "(training fills them from the dataset).")


def initial_context(learner: PromptLearner, n_ctx: int, ctx_init: str | None) -> tuple[nn.Parameter, tuple[int, ...]]:
    """The context parameter ``[n_ctx, W]`` and the fixed tokens that follow it.

    From `ctx_init`'s first n_ctx token embeddings if it has that many tokens, its remaining
    tokens staying fixed text (``_`` read as a space, as the reference does); else N(0, 0.02).
    """
    ids = learner.tokenize([ctx_init]) if ctx_init else None
    return nn.Parameter(text.init_context(learner.clip, ids, n_ctx)), text.fixed_tokens(learner.clip, ids, n_ctx)


class CoOpLearner(PromptLearner):
    """Learned context ``[SOS] ctx_1..ctx_n <text> [EOS]`` on a frozen backbone; options in
    `CoOpOptions` (reference default n_ctx 4; ``csc`` makes ``ctx`` ``[C, n_ctx, W]``, one context
    per class; see `text.prepare_classes` for the class positions)."""

    name = "coop"
    Options = CoOpOptions
    capabilities = Capabilities(text_tokens=("ctx",))

    def __init__(self, backbone: Backbone, **options: Any):
        super().__init__(backbone, **options)
        n_ctx, ctx_init = self.config.n_ctx, self.config.ctx_init
        csc, class_token_position, classnames = self.layout()
        check_count(self.name, "n_ctx", n_ctx, low=1)
        check_text_tower(self.name, backbone, n_ctx)
        if (csc or class_token_position != "end") and not classnames:
            raise UserError(f"learner '{self.name}': csc and class_token_position={class_token_position} need the "
                            "class names (option classnames; training fills them from the dataset)")
        self.n_ctx = n_ctx
        self.csc, self.position = bool(csc), class_token_position
        self.classnames = list(classnames) if classnames else None
        self.ctx, self.fixed = initial_context(self, n_ctx, ctx_init)
        if self.csc:
            self.ctx = nn.Parameter(self.ctx.detach().expand(len(self.classnames), -1, -1).clone())

    def layout(self) -> tuple[bool, str, list[str] | None]:
        """The class-aware layout asked for: csc, class_token_position and classnames."""
        return self.config.csc, self.config.class_token_position, self.config.classnames

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
