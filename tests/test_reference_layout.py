"""Our learners compute the reference implementations' function (reference-semantics.md).

Each test builds a tiny CLIP from an OpenAI-format state dict (QuickGELU, seeded weights), sets
the learner's prompts to known values and compares its features with a re-computation of the
reference's sequence layout written here from the documented semantics: the whole reference
prompt ``prefix + " " + name + "."`` tokenised, positions 1..n overwritten by the context,
positional embeddings added after, deep text prompts replacing positions 1..n and deep vision
prompts replacing the last n tokens at each block's input, the fp16 round trip the reference
applies to every prompt but the shallow text context. Prompt values sit on dyadic grids, exact
in fp16, so that round trip is exact and the features agree to float32 rounding.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.learners import build_learner

from reference_clip import TINY_CONFIG, write_openai_file

CLASSES = ["golden retriever", "red car", "tree"]
BPE = open_clip.tokenizer.SimpleTokenizer()
TOL = 1e-5


@pytest.fixture(scope="module")
def openai_backbone(tmp_path_factory):
    path = write_openai_file(tmp_path_factory.mktemp("openai") / "tiny-openai.pt")
    return load_backbone(str(TINY_CONFIG), pretrained=str(path), device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def dyadic(shape, scale: int, seed: int) -> torch.Tensor:
    """Seeded values k / scale with small integers k: exact in fp16 and in fp32 sums."""
    return torch.randint(-40, 41, shape, generator=torch.Generator().manual_seed(seed)).float() / scale


def set_dyadic(learner) -> None:
    """Every learned tensor of `learner` on a dyadic grid (linear maps coarser, for exact products)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(learner.named_parameters(), key=lambda kv: kv[0])):
            if p.requires_grad:
                scale = 2048 if name.endswith("bias") else (32 * 64 if "proj" in name else 64 * 8)
                p.copy_(dyadic(p.shape, scale, seed=100 + i))


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


# --- the reference, re-computed ------------------------------------------------------------
def ref_text(clip, prompt_ids, edit_input, deep=(), n=0):
    """Text features of the reference: `edit_input` rewrites the token embeddings ``[M, L, W]``."""
    x = edit_input(clip.token_embedding(prompt_ids)) + clip.positional_embedding
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], half(deep[i - 1]).expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=mask)
    x = clip.ln_final(x[torch.arange(x.shape[0]), prompt_ids.argmax(-1)])
    return F.normalize(x @ clip.text_projection, dim=-1)


def ref_image(visual, images, shallow=None, deep=()):
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    if shallow is not None:
        x = torch.cat([x, half(shallow).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):
            n = deep[i - 1].shape[0]
            x = torch.cat([x[:, : x.shape[1] - n], half(deep[i - 1]).expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def overwrite(ctx, n):
    """The reference's shallow context: positions 1..n replaced (no fp16 round trip)."""
    return lambda emb: torch.cat([emb[:, :1], ctx.expand(emb.shape[0], -1, -1), emb[:, 1 + n :]], dim=1)


def tokenize(prefix: str) -> torch.Tensor:
    return open_clip.tokenize([f"{prefix} {c.replace('_', ' ')}." for c in CLASSES], context_length=32)


def reference_prefix(n_ctx: int, ctx_init: str | None) -> str:
    """IVLP/MaPLe (maple.py:84-97): the whole init phrase for n_ctx <= 4, else "X " * n_ctx."""
    return ctx_init.replace("_", " ") if ctx_init and n_ctx <= 4 else " ".join(["X"] * n_ctx)


# --- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_ctx,depth,ctx_init", [(2, 2, "a photo of a"), (4, 2, "a photo of a"),
                                                  (3, 1, "a_photo of a"), (5, 2, "a photo of a big")])
def test_maple_matches_the_reference(openai_backbone, images, n_ctx, depth, ctx_init):
    learner = build_learner("maple", openai_backbone, {"n_ctx": n_ctx, "depth": depth, "ctx_init": ctx_init})
    set_dyadic(learner)
    clip = openai_backbone.model
    with torch.no_grad():
        prompts = list(learner.text_prompts)
        visual = [proj(p) for proj, p in zip(learner.vision_proj, prompts)]  # proj(ctx), proj_j(text_j)
        want_text = ref_text(clip, tokenize(reference_prefix(n_ctx, ctx_init)), overwrite(prompts[0], n_ctx),
                             prompts[1:], n_ctx)
        want_image = ref_image(clip.visual, images, visual[0], visual[1:])
        got_text = learner.encode_texts([f"{c}." for c in CLASSES])
        got_image = learner.encode_images(images)
    assert (got_text - want_text).abs().max() <= TOL
    assert (got_image - want_image).abs().max() <= TOL


@pytest.mark.parametrize("options", [{"n_ctx": 2, "depth": 2, "n_ctx_v": 2, "depth_v": 2},
                                     {"n_ctx": 4, "depth": 1, "n_ctx_v": 3, "depth_v": 2},
                                     {"n_ctx": 2, "depth": 2, "n_ctx_v": 0, "depth_v": 0}])
def test_ivlp_default_layout_matches_the_reference(openai_backbone, images, options):
    learner = build_learner("ivlp", openai_backbone, options)  # default ctx_init "a photo of a"
    set_dyadic(learner)
    clip, n = openai_backbone.model, options["n_ctx"]
    with torch.no_grad():
        prompts, vision = list(learner.text_prompts), list(learner.vision_prompts)
        want_text = ref_text(clip, tokenize(reference_prefix(n, "a photo of a")), overwrite(prompts[0], n),
                             prompts[1:], n)
        want_image = ref_image(clip.visual, images, vision[0] if vision else None, vision[1:])
        got_text = learner.encode_texts([f"{c}." for c in CLASSES])
        got_image = learner.encode_images(images)
    assert (got_text - want_text).abs().max() <= TOL
    assert (got_image - want_image).abs().max() <= TOL


def test_the_fixed_init_words_matter(openai_backbone):
    """Dropping "of a" (the old layout) gives other features: the layout test above could fail."""
    learner = build_learner("ivlp", openai_backbone, {"n_ctx": 2, "depth": 1, "n_ctx_v": 0})
    clip = openai_backbone.model
    with torch.no_grad():
        ctx = learner.text_prompts[0]
        without = ref_text(clip, tokenize("X X"), overwrite(ctx, 2))
        got = learner.encode_texts([f"{c}." for c in CLASSES])
    assert (got - without).abs().max() > 1e-2


def coop_reference(clip, ctx, n, position):
    """CoOp's layouts (coop.py:139-180) for prompts "X X .. X name.": ctx ``[C, n, W]``."""
    ids = tokenize(" ".join(["X"] * n))
    emb = clip.token_embedding(ids)
    prefix, suffix = emb[:, :1], emb[:, 1 + n :]
    rows = []
    for i, name in enumerate(CLASSES):
        name_len = len(BPE.encode(name))
        cls, rest, c = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:], ctx[i : i + 1]
        if position == "end":
            rows.append(torch.cat([prefix[i : i + 1], c, suffix[i : i + 1]], dim=1))
        elif position == "front":
            rows.append(torch.cat([prefix[i : i + 1], cls, c, rest], dim=1))
        else:
            h = n // 2
            rows.append(torch.cat([prefix[i : i + 1], c[:, :h], cls, c[:, h:], rest], dim=1))
    built = torch.cat(rows)
    return ref_text(clip, ids, lambda _: built)


@pytest.mark.parametrize("csc,position", [(True, "end"), (False, "middle"), (False, "front"), (True, "middle"),
                                          (True, "front")])
def test_coop_csc_and_class_positions_match_the_reference(openai_backbone, images, csc, position):
    n = 4
    learner = build_learner("coop", openai_backbone, {"n_ctx": n, "ctx_init": None, "csc": csc,
                                                      "class_token_position": position,
                                                      "classnames": [c.replace(" ", "_") for c in CLASSES]})
    set_dyadic(learner)
    clip = openai_backbone.model
    with torch.no_grad():
        ctx = learner.ctx if csc else learner.ctx.expand(len(CLASSES), -1, -1)
        want = coop_reference(clip, ctx, n, position)
        texts = [f"{c}." for c in CLASSES][::-1]  # any order: each text's class is found by name
        got = learner.encode_texts(texts).flip(0)
        got_image = learner.encode_images(images)
    assert (got - want).abs().max() <= TOL
    assert (got_image - F.normalize(clip.encode_image(images), dim=-1)).abs().max() <= TOL


def test_coop_with_init_words_matches_the_reference(openai_backbone):
    learner = build_learner("coop", openai_backbone)  # n_ctx 4, "a photo of a": coop.py:75-83
    set_dyadic(learner)
    clip = openai_backbone.model
    with torch.no_grad():
        want = ref_text(clip, tokenize("a photo of a"), overwrite(learner.ctx, 4))
        got = learner.encode_texts([f"{c.replace(' ', '_')}." for c in CLASSES])  # "_" read as a space
    assert (got - want).abs().max() <= TOL


def test_cocoop_matches_the_reference(openai_backbone, images):
    learner = build_learner("cocoop", openai_backbone)
    set_dyadic(learner)
    clip = openai_backbone.model
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
        bias = learner.meta_net.linear2(torch.relu(learner.meta_net.linear1(image)))
        want = torch.stack([ref_text(clip, tokenize("a photo of a"), overwrite(learner.ctx + b, 4)) for b in bias])
        got_image = learner.encode_images(images)
        got = learner.encode_texts([f"{c}." for c in CLASSES], image_features=got_image)
    assert got.shape == (2, len(CLASSES), want.shape[-1])
    assert (got - want).abs().max() <= TOL
    assert (got_image - image).abs().max() <= TOL


def test_maple_deep_projections_start_as_copies_of_one_map():
    """maple.py:116-117: the deep projections are deep copies of one Linear; layer 0's is its own."""
    learner = build_learner("maple", load_backbone("toy-clip", device="cpu"), {"depth": 4})
    maps = learner.vision_proj
    assert len(maps) == 4
    for deep in maps[2:]:
        assert torch.equal(deep.weight, maps[1].weight) and torch.equal(deep.bias, maps[1].bias)
        assert deep.weight is not maps[1].weight  # copies, trained independently
    assert not torch.equal(maps[0].weight, maps[1].weight)
