"""Up-front checks of a backbone and of learner options, so a bad choice fails in one clear line.

Context learners rebuild parts of open_clip's forward (token layout, the loop over `resblocks`),
so they support exactly the towers whose forward they rebuild: the text transformer that lives
inside open_clip's ``CLIP`` and, for deep vision prompts, open_clip's ``VisionTransformer``.
Anything else fails here instead of computing something subtly different.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import open_clip
from open_clip.transformer import Transformer, VisionTransformer

from ..errors import UserError

if TYPE_CHECKING:
    from ..backbone import Backbone

TEXT_POOL_TYPES = ("argmax", "eos")
VISION_POOL_TYPES = ("tok", "avg")


def check_count(learner: str, option: str, value: Any, low: int = 0) -> int:
    """Return `value` as an int >= `low`, or fail naming the learner option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"learner '{learner}': option {option} must be an integer >= {low}, got {value!r}")
    return value


REFERENCE_DEPTH = 9


def default_depth(depth: int | None, *towers: Any) -> int:
    """The prompt depth to use: `depth` if given, else the reference 9 capped at the layers of
    the given towers (so a small backbone such as the 4-layer toy-clip works with defaults)."""
    if depth is not None:
        return depth
    layers = [len(t.resblocks) for t in towers if isinstance(getattr(t, "resblocks", None), Iterable)]
    return min([REFERENCE_DEPTH, *layers])


def check_depth(learner: str, option: str, depth: int, layers: int, tower: str, n_ctx: int) -> int:
    """A prompt depth counts the layers whose input carries prompts: at most the tower's layers.

    Without prompt tokens (n_ctx 0) the depth is moot, so a text-only or image-only setting
    needs no matching depth.
    """
    check_count(learner, option, depth)
    if n_ctx and depth > layers:
        raise UserError(
            f"learner '{learner}': {option}={depth} but the {tower} transformer of this backbone has only "
            f"{layers} layers; pass {option} <= {layers} (e.g. --learner-opt {option}={layers})"
        )
    return depth


def check_text_tower(learner: str, backbone: Backbone, n_ctx: int) -> None:
    """The text tower must be open_clip's own (CLIP class, SimpleTokenizer with a start token).

    Raises:
        UserError: a CustomTextCLIP / HF text tower, an unsupported pooling, a tokenizer without
            a start token, or more context tokens than the context length leaves room for.
    """
    clip = backbone.model
    if not isinstance(clip, open_clip.CLIP) or not isinstance(getattr(clip, "transformer", None), Transformer):
        raise UserError(
            f"learner '{learner}' needs an open_clip CLIP with its built-in text transformer; backbone "
            f"{backbone.name} is a {type(clip).__name__} (e.g. an HF text tower), which is not supported"
        )
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool not in TEXT_POOL_TYPES:
        raise UserError(
            f"learner '{learner}': backbone {backbone.name} pools text features with '{pool}'; "
            f"learned contexts need EOS pooling ({', '.join(TEXT_POOL_TYPES)})"
        )
    if getattr(backbone.tokenizer, "sot_token_id", None) is None:
        raise UserError(
            f"learner '{learner}': the tokenizer of {backbone.name} has no start-of-text token to put the "
            "learned context after (only open_clip's SimpleTokenizer is supported)"
        )
    if n_ctx > clip.context_length - 2:
        raise UserError(
            f"learner '{learner}': n_ctx={n_ctx} leaves no room for text (context length {clip.context_length})"
        )


def check_vision_tower(learner: str, backbone: Backbone) -> VisionTransformer:
    """Deep vision prompts need open_clip's ViT with token pooling and no attentional pooler.

    Raises:
        UserError: a ModifiedResNet or timm image tower, attentional pooling, or pool type 'none'.
    """
    visual = getattr(backbone.model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UserError(
            f"learner '{learner}' puts prompts into the image tower and needs open_clip's VisionTransformer; "
            f"backbone {backbone.name} has a {type(visual).__name__} image tower (e.g. ModifiedResNet), "
            "which is not supported"
        )
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type not in VISION_POOL_TYPES:
        raise UserError(
            f"learner '{learner}': the ViT of {backbone.name} uses attentional or '{visual.pool_type}' pooling; "
            f"only {', '.join(VISION_POOL_TYPES)} pooling is supported"
        )
    return visual
