"""Image side of deep-prompt learners: open_clip's ViT forward with vision prompt tokens.

Layout: ``[CLS] <patches> p_1..p_n``. The prompts are appended after the class and patch tokens
have their positional embedding (and patch dropout, which must never drop a prompt), before
``ln_pre``; at the input of each deeper block < depth, the last n tokens are replaced by that
layer's prompts. The prompt tokens (and any extra tokens a layer brings, see
`blocks.LayerPrompts`) are removed before pooling, so 'tok' and 'avg' pooling see exactly the
tokens open_clip pools.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import VisionTransformer

from .blocks import LayerPrompts, run_blocks


def encode_image(visual: VisionTransformer, images: torch.Tensor,
                 prompts: Sequence[torch.Tensor | LayerPrompts | None]) -> torch.Tensor:
    """Unnormalised image features ``[N, D]``.

    Args:
        visual: The backbone's image tower (checked by `checks.check_vision_tower`).
        images: Preprocessed images ``[N, 3, H, W]``.
        prompts: Per layer from layer 0, each ``[n, W_v]``: ``prompts[0]`` is appended before
            ``ln_pre``, ``prompts[i]`` replaces the last n tokens at the input of block i (see
            `blocks.run_blocks` for the other entries). Empty: the plain ``visual(images)``.
    """
    return encode_image_with_prompts(visual, images, prompts)[0]


def encode_image_with_prompts(visual: VisionTransformer, images: torch.Tensor,
                              prompts: Sequence[torch.Tensor | LayerPrompts | None]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_image`, plus the prompt tokens as they leave the last block ``[N, p, W_v]``.

    ANPrompt's visual prototype (NRVPP) reads the output prompt tokens, which pooling drops;
    they are the layer-0 prompts' slot followed by any extra tokens, before ``ln_post``.
    """
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    body = x.shape[1]
    first = prompts[0] if prompts else None
    if first is not None and first.shape[0]:
        x = torch.cat([x, first.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    x = run_blocks(visual.transformer, x, None, prompts[1:], start=body)
    x, prompt_tokens = x[:, :body], x[:, body:]
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(_pool(visual, x))
    else:
        pooled = _pool(visual, visual.ln_post(x))
    return (pooled if visual.proj is None else pooled @ visual.proj), prompt_tokens


def _pool(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The class token ('tok') or the mean of the patch tokens ('avg'), as open_clip pools."""
    return x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
