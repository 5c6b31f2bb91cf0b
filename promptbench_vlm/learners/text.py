"""Text side of context learners: learned context tokens between [SOS] and the prompt's tokens.

Every sequence keeps the text tower's context length L; with n context slots it reads

    [SOS] ctx_1..ctx_n <tokens of the text> [EOS] <padding>

The template words stay text; only the context is learned. A text longer than L - n - 2 tokens
loses its last text tokens, never its EOS (the rule open_clip's tokenizer itself applies to
over-long texts), so features are always read at a real EOS token, through ln_final and the
text projection, exactly as ``CLIP.encode_text`` does.

With a causal text tower, the padding after a batch's last EOS cannot influence any feature, so
the forward stops there: prompts are short (a template is about 10 of CLIP's 77 tokens), and
this cuts the text tower's work, which dominates an evaluation over 60 templates, several fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from open_clip import CLIP
from torch import nn

from .blocks import run_blocks


@dataclass(frozen=True)
class ContextBatch:
    """Tokenised prompts laid out for n context slots, embedded once and reused per context.

    Attributes:
        tokens: Token embeddings ``[M, L, W]``; the n slots after SOS hold placeholders.
        eos: Position of each sequence's EOS token ``[M]``, where features are read.
        n_ctx: The number of context slots.
    """

    tokens: torch.Tensor
    eos: torch.Tensor
    n_ctx: int


def eos_positions(clip: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """Where each tokenised text ends, by the pooling rule of the backbone ('argmax' or 'eos')."""
    if getattr(clip, "text_pool_type", "argmax") == "eos":
        return (ids == clip.text_eos_id).int().argmax(dim=-1)
    return ids.argmax(dim=-1)


def prepare(clip: CLIP, ids: torch.Tensor, n_ctx: int) -> ContextBatch:
    """Shift each text right by `n_ctx` slots after SOS, truncating but keeping EOS.

    Args:
        clip: The backbone model.
        ids: Token ids ``[M, L]`` from the backbone's tokenizer.
        n_ctx: Context slots to open after SOS.
    """
    eos = eos_positions(clip, ids)
    if n_ctx:
        length = ids.shape[1]
        rows = torch.arange(ids.shape[0], device=ids.device)
        eos_ids = ids[rows, eos]
        ids = torch.cat([ids[:, :1], ids.new_zeros(ids.shape[0], n_ctx), ids[:, 1 : length - n_ctx]], dim=1)
        eos = (eos + n_ctx).clamp(max=length - 1)
        ids[rows, eos] = eos_ids
    cast = clip.transformer.get_cast_dtype()
    return ContextBatch(tokens=clip.token_embedding(ids).to(cast), eos=eos, n_ctx=n_ctx)


def encode(clip: CLIP, batch: ContextBatch, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unnormalised text features ``[M, D]`` with learned prompts in place.

    Args:
        clip: The backbone model.
        batch: The prepared prompts.
        prompts: Per layer, from layer 0: ``prompts[0]`` is the context ``[n, W]`` (or ``[M, n, W]``)
            put into the slots before the positional embedding; ``prompts[i]`` replaces the slots
            at the input of block i. Empty when `batch.n_ctx` is 0.
    """
    x = batch.tokens
    if batch.n_ctx:
        ctx = prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + batch.n_ctx :]], dim=1)
    x = x + clip.positional_embedding.to(x.dtype)
    mask = None
    if clip.attn_mask is not None:  # causal: positions after the last EOS cannot reach any feature
        length = int(batch.eos.max()) + 1
        x, mask = x[:, :length], clip.attn_mask[:length, :length]
    x = run_blocks(clip.transformer, x, mask, prompts[1:], start=1)
    x = clip.ln_final(x[torch.arange(x.shape[0], device=x.device), batch.eos])
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def text_feature_dim(clip: CLIP) -> int:
    """The dimension D of the joint embedding (that of image and text features)."""
    proj = clip.text_projection
    if proj is None:
        return int(clip.transformer.width)
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])


def init_context(clip: CLIP, ids: torch.Tensor | None, n_ctx: int) -> torch.Tensor:
    """The initial context ``[n_ctx, W]`` (float32, CPU): the token embeddings of an init text.

    The reference CoOp/MaPLe code initialises from the first n_ctx tokens of "a photo of a" when
    n_ctx is at most its token count, else draws N(0, 0.02). `ids` is the tokenised init text
    ``[1, L]``, or None for the random draw.
    """
    width = clip.token_embedding.weight.shape[1]
    if ids is not None and n_ctx <= int(eos_positions(clip, ids)[0]) - 1:
        with torch.no_grad():
            return clip.token_embedding(ids[0, 1 : 1 + n_ctx]).float().cpu().clone()
    return torch.empty(n_ctx, width).normal_(std=0.02)
