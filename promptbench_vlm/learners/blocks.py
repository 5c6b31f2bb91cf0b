"""The one forward over open_clip's own `resblocks` that deep prompts need.

open_clip's ``Transformer.forward`` runs its blocks with no hook between them; deep prompts
(IVLP, MaPLe) must replace a slot of tokens at the input of each block. Rather than fork or patch
open_clip, this loop calls the very same block modules in order and does the replacement.

A layer may also bring extra tokens (`LayerPrompts`, ANPrompt's anti-noise prompts): they are
kept at the end of the sequence, so every index the callers read (EOS, CLS, the prompt slot)
stays where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from open_clip.transformer import Transformer


class LayerPrompts(NamedTuple):
    """The prompts at one block's input when extra tokens join the deep prompts.

    Attributes:
        slot: ``[n, W]`` replaces the deep-prompt slot as a plain tensor entry does; None keeps it.
        extra: ``[m, W]`` tokens kept at the end of the sequence: appended at the first block that
            has them, replacing the previous block's extras at each later one (deep-prompt style).
            Under a causal mask they are placed as if inserted right before the slot (``start``):
            they see the tokens before it and are seen by every token from it on.
    """

    slot: torch.Tensor | None
    extra: torch.Tensor


def run_blocks(
    transformer: Transformer,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    deep: Sequence[torch.Tensor | LayerPrompts | None],
    start: int,
) -> torch.Tensor:
    """Run every block of `transformer`, replacing prompt tokens before blocks 1..len(deep).

    Args:
        transformer: open_clip's ``Transformer`` (batch-first or not; both are handled).
        x: Batch-first tokens ``[B, L, W]`` entering block 0.
        attn_mask: The mask open_clip would pass (the causal text mask, or None).
        deep: ``deep[i - 1]`` (``[n, W]`` or ``[B, n, W]``) replaces tokens ``start..start+n`` at the
            input of block i; no positional embedding is added to them (as in the reference code).
            A `LayerPrompts` entry also brings extra tokens; None leaves the block's input as is.
        start: Index of the first prompt token in the sequence.

    Returns:
        Batch-first tokens ``[B, L + m, W]`` after the last block (m extra tokens at the end).
    """
    n_extra = 0
    for i, block in enumerate(transformer.resblocks):
        entry = deep[i - 1] if 1 <= i <= len(deep) else None
        slot, extra = entry if isinstance(entry, LayerPrompts) else (entry, None)
        if slot is not None:
            prompt = slot.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :start], prompt, x[:, start + prompt.shape[1] :]], dim=1)
        if extra is not None:
            x, attn_mask = _put_extra(x, attn_mask, extra, n_extra, start)
            n_extra = extra.shape[-2]
        if transformer.batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def _put_extra(x: torch.Tensor, attn_mask: torch.Tensor | None, extra: torch.Tensor, n_extra: int, start: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append `extra` at the end of `x` (or replace the `n_extra` extras already there)."""
    tokens = extra.to(x.dtype).expand(x.shape[0], -1, -1)
    if n_extra:
        if tokens.shape[1] != n_extra:
            raise ValueError(f"extra tokens change from {n_extra} to {tokens.shape[1]} between blocks")
        return torch.cat([x[:, :-n_extra], tokens], dim=1), attn_mask
    if attn_mask is not None:
        attn_mask = _causal_mask_with_extra(attn_mask, x.shape[1], tokens.shape[1], start)
    return torch.cat([x, tokens], dim=1), attn_mask


def _causal_mask_with_extra(causal: torch.Tensor, length: int, m: int, start: int) -> torch.Tensor:
    """The causal mask of `length` tokens plus m tail tokens ordered as if they stood at `start`.

    Attention is permutation-equivariant and the extras carry no positional embedding, so
    keeping them at the tail with this mask computes exactly what inserting them would.
    """
    rows = torch.arange(length, device=causal.device)
    order = torch.cat([torch.where(rows < start, rows, rows + m), start + torch.arange(m, device=causal.device)])
    blocked = order[None, :] > order[:, None]
    return torch.zeros(length + m, length + m, dtype=causal.dtype, device=causal.device).masked_fill(
        blocked, float("-inf"))
