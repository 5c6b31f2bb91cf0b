"""Text side of context learners: learned context tokens between [SOS] and the prompt's tokens.

Every sequence keeps the text tower's context length L; with n context slots it reads

    [SOS] ctx_1..ctx_n <fixed tokens> <tokens of the text> [EOS] <padding>

The template words stay text; only the context is learned. The fixed tokens are the rest of the
init phrase after its first n tokens, as in the reference code, which tokenises the whole init
phrase and overwrites only positions 1..n: with n = 2 and "a photo of a", ``[SOS] ctx ctx of a
golden retriever . [EOS]`` (`fixed_tokens`). CoOp's other class-token positions (``front``,
``middle``) put the slots elsewhere (`prepare_classes`). A text longer than L - n - 2 tokens
loses its last text tokens, never its EOS (the rule open_clip's tokenizer itself applies to
over-long texts), so features are always read at a real EOS token, through ln_final and the
text projection, exactly as ``CLIP.encode_text`` does.

With a causal text tower, the padding after a batch's last EOS cannot influence any feature, so
the forward stops there: prompts are short (a template is about 10 of CLIP's 77 tokens), and
this cuts the text tower's work, which dominates an evaluation over 60 templates, several fold.
"""

from __future__ import annotations

import re
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
        slots: Positions of the context slots ``[M, n_ctx]``; None: positions 1..n_ctx.
        classes: The class index of each text ``[M]`` (class-specific context); None: not known.
    """

    tokens: torch.Tensor
    eos: torch.Tensor
    n_ctx: int
    slots: torch.Tensor | None = None
    classes: torch.Tensor | None = None


def eos_positions(clip: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """Where each tokenised text ends, by the pooling rule of the backbone ('argmax' or 'eos')."""
    if getattr(clip, "text_pool_type", "argmax") == "eos":
        return (ids == clip.text_eos_id).int().argmax(dim=-1)
    return ids.argmax(dim=-1)


def prepare(clip: CLIP, ids: torch.Tensor, n_ctx: int, fixed: Sequence[int] = ()) -> ContextBatch:
    """Shift each text right by `n_ctx` slots (and the `fixed` tokens) after SOS, truncating but
    keeping EOS.

    Args:
        clip: The backbone model.
        ids: Token ids ``[M, L]`` from the backbone's tokenizer.
        n_ctx: Context slots to open after SOS.
        fixed: Token ids put right after the slots (see `fixed_tokens`).
    """
    eos = eos_positions(clip, ids)
    shift = n_ctx + len(fixed)
    if shift:
        length = ids.shape[1]
        rows = torch.arange(ids.shape[0], device=ids.device)
        eos_ids = ids[rows, eos]
        inserted = torch.tensor([0] * n_ctx + list(fixed), dtype=ids.dtype, device=ids.device)
        ids = torch.cat([ids[:, :1], inserted.expand(ids.shape[0], -1), ids[:, 1 : length - shift]], dim=1)
        eos = (eos + shift).clamp(max=length - 1)
        ids[rows, eos] = eos_ids
    if clip.attn_mask is not None and len(ids):  # causal: what follows the last EOS reaches no feature
        ids = ids[:, : int(eos.max()) + 1]
    return ContextBatch(tokens=embed(clip, ids), eos=eos, n_ctx=n_ctx)


def embed(clip: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings in the text tower's compute dtype."""
    return clip.token_embedding(ids).to(clip.transformer.get_cast_dtype())


def prepare_classes(clip: CLIP, tokenizer, texts: Sequence[str], classnames: Sequence[str], n_ctx: int,
                    position: str, fixed: Sequence[int] = ()) -> ContextBatch:
    """Lay out texts around their class name, CoOp's class-token positions (reference ``coop.py``).

    With the class name cut out of the text (its "rest"), the sequence reads ``[SOS] ctx <text>``
    for ``end`` (the usual layout), ``[SOS] <class> ctx <rest>`` for ``front`` and
    ``[SOS] ctx[:n//2] <class> ctx[n//2:] <rest>`` for ``middle``; each then ``[EOS]``. For the
    reference's template ``"{}."``, the rest is the ``.``. The `fixed` tokens follow the context.

    Raises:
        ValueError: a text that holds none of `classnames`.
    """
    classes, names, rests = [], [], []
    for t in texts:
        c, (start, stop) = find_class(t, classnames)
        classes.append(c)
        names.append(t[start:stop])
        rests.append(" ".join((t[:start].strip() + " " + t[stop:].strip()).split()))
    ids = tokenizer([*names, *rests, *texts])
    eos = eos_positions(clip, ids)
    body = [ids[i, 1 : int(eos[i])].tolist() for i in range(len(ids))]
    sot, length, half = int(ids[0, 0]), ids.shape[1], n_ctx // 2
    rows, slot_rows, ends = [], [], []
    m = len(texts)
    for i in range(m):
        name, rest = body[i], body[m + i]
        if position == "front":
            seq, slots = [sot, *name, *[0] * n_ctx, *fixed], list(range(1 + len(name), 1 + len(name) + n_ctx))
        elif position == "middle":
            seq = [sot, *[0] * half, *name, *[0] * (n_ctx - half), *fixed]
            slots = [*range(1, 1 + half), *range(1 + half + len(name), 1 + n_ctx + len(name))]
        else:
            seq, slots, rest = [sot, *[0] * n_ctx, *fixed], list(range(1, 1 + n_ctx)), body[2 * m + i]
        seq = (seq + rest)[: length - 1] + [int(ids[2 * m + i, int(eos[2 * m + i])])]
        if max(slots) >= len(seq) - 1:
            raise ValueError(f"text {texts[i]!r}: the class name leaves no room for the context")
        ends.append(len(seq) - 1)
        rows.append(seq + [0] * (length - len(seq)))
        slot_rows.append(slots)
    device = ids.device
    return ContextBatch(tokens=embed(clip, torch.tensor(rows, device=device)), eos=torch.tensor(ends, device=device),
                        n_ctx=n_ctx, slots=torch.tensor(slot_rows, device=device),
                        classes=torch.tensor(classes, device=device))


def find_class(text: str, classnames: Sequence[str]) -> tuple[int, tuple[int, int]]:
    """The index of the class named in `text` (the longest name found as whole words) and its span.

    Class names are compared as the reference writes them: ``_`` read as a space, any case.

    Raises:
        ValueError: no class name occurs in the text.
    """
    lowered = text.lower()
    best: tuple[int, tuple[int, int]] | None = None
    for c, name in enumerate(classnames):
        needle = name.replace("_", " ").lower().strip()
        match = re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", lowered) if needle else None
        if match and (best is None or match.end() - match.start() > best[1][1] - best[1][0]):
            best = (c, match.span())
    if best is None:
        raise ValueError(f"text {text!r} names none of the learner's classes")
    return best


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
        if batch.slots is None:
            x = torch.cat([x[:, :1], ctx, x[:, 1 + batch.n_ctx :]], dim=1)
        else:
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(batch.slots)
            x = x.index_put((rows, batch.slots), ctx)
    x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
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
    if fits(clip, ids, n_ctx):
        with torch.no_grad():
            return clip.token_embedding(ids[0, 1 : 1 + n_ctx]).float().cpu().clone()
    return torch.empty(n_ctx, width).normal_(std=0.02)


def fits(clip: CLIP, ids: torch.Tensor | None, n_ctx: int) -> bool:
    """Whether the tokenised init text `ids` ``[1, L]`` has at least n_ctx tokens."""
    return ids is not None and n_ctx <= int(eos_positions(clip, ids)[0]) - 1


def fixed_tokens(clip: CLIP, ids: torch.Tensor | None, n_ctx: int) -> tuple[int, ...]:
    """The init text's tokens after its first n_ctx: they stay fixed text after the context.

    Empty when the init text is too short for n_ctx (the context is then drawn at random).
    """
    if not fits(clip, ids, n_ctx):
        return ()
    return tuple(int(t) for t in ids[0, 1 + n_ctx : int(eos_positions(clip, ids)[0])])
