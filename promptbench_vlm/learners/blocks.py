"""The one forward over open_clip's own `resblocks` that deep prompts need.

open_clip's ``Transformer.forward`` runs its blocks with no hook between them; deep prompts
(IVLP, MaPLe) must replace a slot of tokens at the input of each block. Rather than fork or patch
open_clip, this loop calls the very same block modules in order and does the replacement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import Transformer


def run_blocks(
    transformer: Transformer,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    deep: Sequence[torch.Tensor],
    start: int,
) -> torch.Tensor:
    """Run every block of `transformer`, replacing prompt tokens before blocks 1..len(deep).

    Args:
        transformer: open_clip's ``Transformer`` (batch-first or not; both are handled).
        x: Batch-first tokens ``[B, L, W]`` entering block 0.
        attn_mask: The mask open_clip would pass (the causal text mask, or None).
        deep: ``deep[i - 1]`` (``[n, W]`` or ``[B, n, W]``) replaces tokens ``start..start+n`` at the
            input of block i; no positional embedding is added to them (as in the reference code).
        start: Index of the first prompt token in the sequence.

    Returns:
        Batch-first tokens ``[B, L, W]`` after the last block.
    """
    for i, block in enumerate(transformer.resblocks):
        if 1 <= i <= len(deep):
            prompt = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :start], prompt, x[:, start + prompt.shape[1] :]], dim=1)
        if transformer.batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x
