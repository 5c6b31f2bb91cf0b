"""Built-in prompt learners (coop, cocoop, ivlp, maple) on the tiny open_clip model.

Checks: exactness against the plain backbone where the prompts are neutral, that deep prompts
act exactly at layers < depth on both towers, that gradients reach the prompts and never the
backbone, checkpoint round trips and the errors users meet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors import safe_open
from safetensors.torch import save_file

from promptbench_vlm.backbone import Backbone, load_backbone
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import LEARNERS, build_learner, load_learner_checkpoint
from promptbench_vlm.learners.base import PromptLearner

CLASSES = ["dog", "red car", "tree"]
SMALL = {  # options that fit the 2-layer tiny model
    "coop": {},
    "cocoop": {},
    "ivlp": {"depth": 2, "depth_v": 2},
    "maple": {"depth": 2},
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def encode_both(learner: PromptLearner, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features and (for conditional learners, image-conditioned) text features."""
    image_features = learner.encode_images(images)
    texts = [f"a photo of a {c}." for c in CLASSES]
    if learner.conditional:
        return image_features, learner.encode_texts(texts, image_features=image_features)
    return image_features, learner.encode_texts(texts)


def layer_prompts(learner: PromptLearner, tower: str) -> list[torch.Tensor]:
    """The prompts each layer gets on `tower`, as the learner computes them."""
    return list(learner.text_prompts) if tower == "text" else learner.vision_layer_prompts()


def owner_of_layer(learner: PromptLearner, tower: str, k: int) -> torch.Tensor:
    """The parameter that defines the layer-k prompts of `tower`."""
    if tower == "image":
        return learner.vision_proj[k].bias if learner.name == "maple" else learner.vision_prompts[k]
    return learner.text_prompts[k]


def tower_output(learner: PromptLearner, tower: str, images: torch.Tensor) -> torch.Tensor:
    return learner.encode_texts(["dog."]) if tower == "text" else learner.encode_images(images)


@contextmanager
def nudged(param: torch.Tensor) -> Iterator[None]:
    """Temporarily add seeded noise to a parameter (a constant shift would vanish in LayerNorm)."""
    noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.no_grad():
        param.add_(noise)
    try:
        yield
    finally:
        with torch.no_grad():
            param.sub_(noise)


@contextmanager
def block_io(blocks: torch.nn.ModuleList) -> Iterator[tuple[list, list]]:
    """Record each block's input and output tokens (torch hooks; open_clip is untouched)."""
    inputs: list = [None] * len(blocks)
    outputs: list = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def test_builtin_learners_are_registered():
    assert {"zeroshot", "coop", "cocoop", "ivlp", "maple"} <= set(LEARNERS.names())


def test_zeroshot_short_text_forward_is_open_clip_encode_text(tiny_backbone):
    """Stopping the causal text forward at the batch's last EOS gives open_clip's own features,
    for texts of very different lengths in one batch (the reference every exactness test uses)."""
    zeroshot = build_learner("zeroshot", tiny_backbone)
    assert zeroshot.short_text_forward
    texts = ["dog.", "a photo of a dog.", "itap of the big red dog in a dark room.", " ".join(["word"] * 40) + "."]
    clip = tiny_backbone.model
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tiny_backbone.tokenizer(texts)), dim=-1)
        got = zeroshot.encode_texts(texts)
        alone = torch.cat([zeroshot.encode_texts([t]) for t in texts])
    assert (got - expected).abs().max() <= 1e-5 and (alone - expected).abs().max() <= 1e-5


def test_coop_photo_init_with_bare_template_is_zeroshot(tiny_backbone):
    zeroshot = build_learner("zeroshot", tiny_backbone)
    coop = build_learner("coop", tiny_backbone)
    with torch.no_grad():
        expected = zeroshot.encode_texts([f"a photo of a {c}." for c in CLASSES])
        got = coop.encode_texts([f"{c}." for c in CLASSES])
    assert (got - expected).abs().max() <= 1e-5


def test_too_long_text_is_truncated_keeping_eos(tiny_backbone):
    """The context pushes text tokens out; EOS stays, like the tokenizer's own truncation."""
    long_text = " ".join(["word"] * 40) + "."
    zeroshot = build_learner("zeroshot", tiny_backbone)
    coop = build_learner("coop", tiny_backbone)
    with torch.no_grad():
        expected = zeroshot.encode_texts(["a photo of a " + long_text])
        got = coop.encode_texts([long_text])
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name,options", [("ivlp", {"depth": 0, "n_ctx_v": 0}), ("maple", {"depth": 0})])
def test_neutral_deep_learners_reproduce_the_backbone(tiny_backbone, images, name, options):
    learner = build_learner(name, tiny_backbone, options)
    clip = tiny_backbone.model
    texts = [f"a photo of a {c}." for c in CLASSES]
    with torch.no_grad():
        assert (learner.encode_images(images) - F.normalize(clip.encode_image(images), dim=-1)).abs().max() <= 1e-5
        plain = F.normalize(clip.encode_text(tiny_backbone.tokenizer(texts)), dim=-1)
        assert (learner.encode_texts(texts) - plain).abs().max() <= 1e-5
    assert learner.learned_state() == {}


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("tower", ["text", "image"])
@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_deep_prompts_act_exactly_below_depth(tiny_backbone, images, name, tower, depth):
    options = {"depth": depth, "depth_v": depth} if name == "ivlp" else {"depth": depth}
    learner = build_learner(name, tiny_backbone, options)
    clip = tiny_backbone.model
    blocks = (clip.transformer if tower == "text" else clip.visual.transformer).resblocks
    with torch.no_grad():
        base = tower_output(learner, tower, images)
        for k in range(depth):  # every layer's prompts matter
            with nudged(owner_of_layer(learner, tower, k)):
                assert (tower_output(learner, tower, images) - base).abs().max() > 1e-4, f"layer {k}"
        prompts = layer_prompts(learner, tower)
        assert len(prompts) == depth
        n = prompts[0].shape[0]
        with block_io(blocks) as (inputs, outputs):
            tower_output(learner, tower, images)
        for k in range(1, len(blocks)):
            slot = slice(1, 1 + n) if tower == "text" else slice(-n, None)
            if k < depth:  # replaced by layer k's own prompts
                torch.testing.assert_close(inputs[k][:, slot], prompts[k].expand(inputs[k].shape[0], -1, -1))
            else:  # untouched: what block k-1 produced
                torch.testing.assert_close(inputs[k][:, slot], outputs[k - 1][:, slot])


def test_maple_vision_follows_text_context_and_ivlp_does_not(tiny_backbone, images):
    for name, options, coupled in [("maple", {"depth": 2}, True), ("ivlp", {"depth": 2, "depth_v": 2}, False)]:
        learner = build_learner(name, tiny_backbone, options)
        with torch.no_grad():
            base = learner.encode_images(images)
            with nudged(learner.text_prompts[0]):
                moved = (learner.encode_images(images) - base).abs().max() > 1e-4
        assert moved == coupled, name


@pytest.mark.parametrize("name", ["coop", "cocoop", "ivlp", "maple"])
def test_gradients_reach_every_prompt_and_no_backbone_parameter(tiny_backbone, images, name):
    torch.manual_seed(0)  # CoCoOp's 2-unit meta-net hidden layer could start dead (ReLU) for other draws
    learner = build_learner(name, tiny_backbone, SMALL[name])
    image_features, text_features = encode_both(learner, images)
    if learner.conditional:
        logits = torch.einsum("nd,ncd->nc", image_features, text_features)
    else:
        logits = image_features @ text_features.T
    F.cross_entropy(learner.logit_scale * logits, torch.tensor([0, 1, 2])).backward()
    learned = {k: p for k, p in learner.named_parameters() if not k.startswith("clip.")}
    assert set(learned) == set(learner.learned_state())
    for k, p in learned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
    for k, p in tiny_backbone.model.named_parameters():
        assert not p.requires_grad and p.grad is None, k


def test_cocoop_text_depends_on_each_image(tiny_backbone, images):
    learner = build_learner("cocoop", tiny_backbone)
    assert learner.conditional
    with torch.no_grad():
        image_features = learner.encode_images(images)
        out = learner.encode_texts(["dog.", "cat.", "tree."], image_features=image_features)
    assert out.shape == (3, 3, image_features.shape[1])
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 3))
    assert (out[0] - out[1]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="image_features"):
        learner.encode_texts(["dog."])


@pytest.mark.parametrize("name", ["coop", "cocoop", "ivlp", "maple"])
def test_checkpoint_round_trip(tiny_backbone, images, tmp_path, name):
    learner = build_learner(name, tiny_backbone, SMALL[name])
    with torch.no_grad():
        for p in learner.learned_state():
            learner.get_parameter(p).add_(torch.randn_like(learner.get_parameter(p)) * 0.1)
    path = learner.save(tmp_path / f"{name}.safetensors")
    loaded = load_learner_checkpoint(path, tiny_backbone)
    assert type(loaded) is type(learner) and loaded.options == learner.options
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(learner.learned_state())
    with torch.no_grad():
        for a, b in zip(encode_both(learner, images), encode_both(loaded, images)):
            assert torch.equal(a, b)


def test_checkpoint_missing_tensor_or_other_backbone_is_a_user_error(tiny_backbone, tmp_path):
    learner = build_learner("ivlp", tiny_backbone, SMALL["ivlp"])
    path = learner.save(tmp_path / "ivlp.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "vision_prompts.1"}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="vision_prompts.1"):
        load_learner_checkpoint(tmp_path / "cut.safetensors", tiny_backbone)
    other = load_backbone(str(TINY_CONFIG), device="cpu")
    with torch.no_grad():
        other.model.ln_final.weight.mul_(1.5)  # the same architecture, other weights
    with pytest.raises(UserError, match="trained on backbone"):
        load_learner_checkpoint(path, other)


def test_options_record_every_default(tiny_backbone):
    learner = build_learner("ivlp", tiny_backbone, {"depth": 1, "depth_v": 1})
    assert learner.options == {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 1, "n_ctx_v": 2, "depth_v": 1}
    maple = build_learner("maple", tiny_backbone, {"depth": 1})
    assert maple.options == {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 1}
    assert build_learner("coop", tiny_backbone).options == {"n_ctx": 4, "ctx_init": "a photo of a", "csc": False,
                                                             "class_token_position": "end", "classnames": None}
    assert build_learner("cocoop", tiny_backbone).options == {"n_ctx": 4, "ctx_init": "a photo of a"}


def test_context_init_rule(tiny_backbone):
    """From the init text when n_ctx <= its token count (first n_ctx tokens), else N(0, 0.02)."""
    embedding = tiny_backbone.model.token_embedding
    ids = tiny_backbone.tokenizer(["a photo of a"])[0]
    two = build_learner("coop", tiny_backbone, {"n_ctx": 2})
    torch.testing.assert_close(two.ctx.detach(), embedding(ids[1:3]))
    eight = build_learner("coop", tiny_backbone, {"n_ctx": 8}).ctx.detach()
    assert eight.shape == (8, 64) and 0.01 < eight.std() < 0.03
    assert build_learner("coop", tiny_backbone, {"n_ctx": 2, "ctx_init": None}).ctx.std() < 0.03


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("maple", {"depth": 9}, "depth=9 but the text transformer of this backbone has only 2 layers"),
        ("ivlp", {"depth": 1, "depth_v": 3}, "depth_v=3 but the image transformer"),
        ("coop", {"n_ctx": 0}, "n_ctx must be an integer >= 1"),
        ("ivlp", {"n_ctx": "two"}, "n_ctx must be an integer"),
        ("coop", {"n_ctx": 40}, "leaves no room"),
        ("coop", {"depth": 2}, "unknown learner 'coop' option 'depth'.*Valid: class_token_position, classnames, csc, ctx_init, n_ctx"),
        ("zeroshot", {"n_ctx": 2}, "learner 'zeroshot' takes no options, got 'n_ctx'"),
    ],
)
def test_bad_options_are_user_errors(tiny_backbone, name, options, message):
    with pytest.raises(UserError, match=message):
        build_learner(name, tiny_backbone, options)


def tiny_backbone_of(model: torch.nn.Module, tokenizer: Callable) -> Backbone:
    return Backbone(model=model, tokenizer=tokenizer, preprocess=lambda x: x, name="odd", spec="odd", pretrained=None)


def test_unsupported_towers_are_user_errors(tiny_backbone):
    text_cfg = CLIPTextCfg(context_length=32, vocab_size=100, width=32, heads=2, layers=1)
    resnet = open_clip.CLIP(32, CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32), text_cfg)
    backbone = tiny_backbone_of(resnet, tiny_backbone.tokenizer)
    for name in ("ivlp", "maple"):
        with pytest.raises(UserError, match="ModifiedResNet"):
            build_learner(name, backbone, {"depth": 1, "depth_v": 1} if name == "ivlp" else {"depth": 1})
    build_learner("coop", backbone, {"ctx_init": None})  # text-only prompts do not care about the image tower
    vit_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    custom = open_clip.CustomTextCLIP(32, vit_cfg, text_cfg)
    with pytest.raises(UserError, match="CustomTextCLIP"):
        build_learner("coop", tiny_backbone_of(custom, tiny_backbone.tokenizer))
    ids = torch.tensor([[98, 5, 7, 99] + [0] * 28])  # within the odd tower's 100-token vocabulary
    zeroshot = build_learner("zeroshot", tiny_backbone_of(custom, lambda texts: ids.expand(len(texts), -1)))
    assert not zeroshot.short_text_forward  # any other text tower: its own encode_text
    with torch.no_grad():
        assert torch.equal(zeroshot.encode_texts(["a dog."]), F.normalize(custom.encode_text(ids), dim=-1))


def test_default_depth_is_the_reference_9_capped_at_the_backbone(tiny_backbone):
    maple = build_learner("maple", tiny_backbone)
    ivlp = build_learner("ivlp", tiny_backbone)
    assert maple.options["depth"] == 2 and len(maple.text_prompts) == 2  # the tiny model has 2 layers
    assert ivlp.options["depth"] == 2 and ivlp.options["depth_v"] == 2
    maple.train()
    assert maple.training and not maple.clip.training  # the frozen backbone stays in eval mode
