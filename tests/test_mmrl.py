"""The `mmrl` learner (MMRL, CVPR 2025) on the tiny open_clip model (2 layers per tower).

Checks the learner tests the other learners pass (exactness where the tokens are absent, tokens
acting only from their first layer, gradients reaching only its parameters, checkpoint round
trip, cache key), its two inference paths as docs/methods-mmrl.md states them, its loss, and a
few `erm` and `promise` steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import ColourDataset

from promptbench_vlm.cache import image_key, text_key
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner, load_learner_checkpoint
from promptbench_vlm.learners.mmrl import MMRLLearner, default_first_layer
from promptbench_vlm.train.method import build_method

CLASSES = ["dog", "red car", "tree"]
TEXTS = [f"a photo of a {c}." for c in CLASSES]
LABELS = torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def mmrl(backbone, **options) -> MMRLLearner:
    torch.manual_seed(0)
    return build_learner("mmrl", backbone, {"rep_dim": 16, **options})


@contextmanager
def block_io(blocks: torch.nn.ModuleList) -> Iterator[tuple[list, list]]:
    """Each block's input and output tokens (torch hooks; open_clip is untouched)."""
    inputs: list = [None] * len(blocks)
    outputs: list = [None] * len(blocks)
    handles = [h for i, b in enumerate(blocks) for h in (
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])),
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def test_defaults_are_the_published_config_with_layers_capped_at_the_towers(tiny_backbone):
    learner = build_learner("mmrl", tiny_backbone)
    assert learner.options == {"n_rep_tokens": 5, "rep_dim": 512, "first_layer": 2, "alpha": 0.7,
                               "reg_weight": 1.0, "branch": "auto"}
    assert default_first_layer(12) == 6 and default_first_layer(4) == 3 and default_first_layer(2) == 2
    assert learner.capabilities.default_lr == 0.001 and learner.capabilities.optimizer == "adamw"
    assert learner.rep_tokens.shape == (5, 512) and len(learner.text_proj_w) == len(learner.vision_proj_w) == 1
    with pytest.raises(UserError, match="first_layer=3 but"):
        build_learner("mmrl", tiny_backbone, {"first_layer": 3})
    with pytest.raises(UserError, match="first_layer must be an integer >= 2"):
        build_learner("mmrl", tiny_backbone, {"first_layer": 1})
    with pytest.raises(UserError, match="branch"):
        build_learner("mmrl", tiny_backbone, {"branch": "base"})


def test_without_tokens_both_towers_are_the_backbone_exactly(tiny_backbone, images):
    learner = mmrl(tiny_backbone, n_rep_tokens=0).eval()
    clip = tiny_backbone.model
    with torch.no_grad():
        plain_image = F.normalize(clip.encode_image(images), dim=-1)
        plain_text = F.normalize(clip.encode_text(tiny_backbone.tokenizer(TEXTS)), dim=-1)
        for subset in ("base", "new"):
            with learner.scoring(subset):
                assert (learner.encode_images(images) - plain_image).abs().max() <= 1e-5
        assert (learner.encode_texts(TEXTS) - plain_text).abs().max() <= 1e-5


@pytest.mark.parametrize("tower", ["text", "image"])
def test_tokens_act_only_from_their_first_layer(tiny_backbone, images, tower):
    """Inputs of blocks below first_layer are the backbone's; from it on, the projected tokens
    join the sequence (after [SOS] under the causal mask: kept at the tail, see blocks.py)."""
    clip = tiny_backbone.model
    blocks = (clip.transformer if tower == "text" else clip.visual.transformer).resblocks
    learner = mmrl(tiny_backbone, first_layer=2).eval()
    run = (lambda: learner.encode_texts(TEXTS)) if tower == "text" else (lambda: learner.encode_images(images))
    plain = (lambda: clip.encode_text(tiny_backbone.tokenizer(TEXTS))) if tower == "text" else (
        lambda: clip.encode_image(images))
    with torch.no_grad():
        with block_io(blocks) as (inputs, outputs):
            run()
        with block_io(blocks) as (plain_inputs, _):
            plain()
        n = plain_inputs[0].shape[1] if tower == "image" else inputs[0].shape[1]
        torch.testing.assert_close(inputs[0][:, :n], plain_inputs[0][:, :n])  # block 0 (layer 1): untouched
        assert inputs[0].shape[1] == n
        weights, biases = (learner.text_proj_w, learner.text_proj_b) if tower == "text" else (
            learner.vision_proj_w, learner.vision_proj_b)
        tokens = learner.rep_tokens @ weights[0].T + biases[0]
        assert inputs[1].shape[1] == outputs[0].shape[1] + 5  # layer 2 gets the 5 tokens
        torch.testing.assert_close(inputs[1][:, -5:], tokens.expand(inputs[1].shape[0], -1, -1))
        torch.testing.assert_close(inputs[1][:, :-5], outputs[0])


def test_gradients_reach_every_mmrl_parameter_and_no_backbone_parameter(tiny_backbone, images):
    learner = mmrl(tiny_backbone).train()
    loss, _ = learner.extra_loss(images, LABELS, TEXTS)
    (loss + F.cross_entropy(learner.logit_scale * learner.encode_images(images) @ learner.encode_texts(TEXTS).T,
                            LABELS)).backward()
    learned = {k: p for k, p in learner.named_parameters() if not k.startswith("clip.")}
    assert set(learned) == set(learner.learned_state())
    assert set(learned) >= {"rep_tokens", "proj_rep", "text_proj_w.0", "vision_proj_b.0"}
    for k, p in learned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
    for k, p in tiny_backbone.model.named_parameters():
        assert not p.requires_grad and p.grad is None, k


def test_base_and_new_paths_differ_exactly_as_documented(tiny_backbone, images):
    """base/all: alpha f_cls + (1 - alpha) f_rep (unit features, the sum left unnormalised, so
    cosine logits are the reference's combined logits); new: f_cls; training: f_cls."""
    learner = mmrl(tiny_backbone).eval()
    with torch.no_grad():
        cls, rep = learner.image_branches(images)
        with learner.scoring("base@held-out"):
            base = learner.encode_images(images)
            assert learner.feature_mode == "fused"
        with learner.scoring("all"):
            torch.testing.assert_close(learner.encode_images(images), base)
        with learner.scoring("new"):
            new = learner.encode_images(images)
            assert learner.feature_mode == "cls"
        with learner.scoring("target:toy-forms@held-out"):  # a transfer target: unseen, as new classes
            torch.testing.assert_close(learner.encode_images(images), new)
        torch.testing.assert_close(base, 0.7 * cls + 0.3 * rep)
        torch.testing.assert_close(new, cls)
        assert (base - new).abs().max() > 1e-3
        text = learner.encode_texts(TEXTS)
        torch.testing.assert_close(base @ text.T, 0.7 * cls @ text.T + 0.3 * rep @ text.T)
        torch.testing.assert_close(learner.train().encode_images(images), cls)
    fixed = mmrl(tiny_backbone, branch="cls").eval()
    with torch.no_grad(), fixed.scoring("base"):
        torch.testing.assert_close(fixed.encode_images(images), fixed.image_branches(images)[0])


def test_loss_is_the_reference_combination(tiny_backbone, images):
    learner = mmrl(tiny_backbone).train()
    clip = tiny_backbone.model
    with torch.no_grad():
        extra, diagnostics = learner.extra_loss(images, LABELS, TEXTS)
        cls, rep = learner.image_branches(images)
        text = learner.encode_texts(TEXTS)
        scale = learner.logit_scale
        ce_cls, ce_rep = (F.cross_entropy(scale * f @ text.T, LABELS) for f in (cls, rep))
        d_img = 1 - F.cosine_similarity(cls, clip.encode_image(images), dim=-1).mean()
        d_text = 1 - F.cosine_similarity(text, clip.encode_text(tiny_backbone.tokenizer(TEXTS)), dim=-1).mean()
        torch.testing.assert_close(ce_cls + extra, 0.7 * ce_cls + 0.3 * ce_rep + d_img + d_text)
    assert diagnostics["reg_image"] == pytest.approx(float(d_img), abs=1e-6)


def test_checkpoint_round_trip(tiny_backbone, images, tmp_path):
    learner = mmrl(tiny_backbone)
    with torch.no_grad():
        for name in learner.learned_state():
            learner.get_parameter(name).add_(torch.randn_like(learner.get_parameter(name)) * 0.1)
    loaded = load_learner_checkpoint(learner.save(tmp_path / "mmrl.safetensors"), tiny_backbone)
    assert type(loaded) is MMRLLearner and loaded.options == learner.options
    learner.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(learner.encode_texts(TEXTS), loaded.encode_texts(TEXTS))
        for subset in ("base", "new"):
            with learner.scoring(subset), loaded.scoring(subset):
                assert torch.equal(learner.encode_images(images), loaded.encode_images(images))


def test_cache_keys_follow_the_state_and_the_inference_path(tiny_backbone):
    learner, dataset = mmrl(tiny_backbone).eval(), ColourDataset()
    ivlp = build_learner("ivlp", tiny_backbone, {"depth": 2, "depth_v": 2})
    with learner.scoring("base"):
        base = image_key(learner, dataset, "test", "cpu-float32")
    with learner.scoring("new"):
        new = image_key(learner, dataset, "test", "cpu-float32")
    assert base != new and base["feature_mode"] == "fused" and new["feature_mode"] == "cls"
    assert base != image_key(ivlp, dataset, "test", "cpu-float32") and "feature_mode" not in image_key(
        ivlp, dataset, "test", "cpu-float32")
    text = text_key(learner, "cpu-float32")
    with torch.no_grad():
        learner.rep_tokens.add_(0.1)
    with learner.scoring("base"):
        assert image_key(learner, dataset, "test", "cpu-float32") != base
    assert text_key(learner, "cpu-float32") != text


@pytest.mark.parametrize("method,options", [
    ("erm", {"template": "a photo of a {}."}),
    ("promise", {"templates_in": 3, "templates_out": 3, "inner_steps": 1, "track_improvement": False}),
])
def test_a_few_training_steps_move_the_parameters_with_a_finite_loss(tiny_backbone, images, method, options):
    learner = mmrl(tiny_backbone).train()
    trainer = build_method(method, learner, CLASSES, options)
    optimizer = trainer.build_optimizer(0.01, 0.9, 5e-4)
    assert isinstance(optimizer, torch.optim.AdamW if method == "erm" else torch.optim.SGD)
    before = {k: v.clone() for k, v in learner.learned_state().items()}
    for _ in range(3):
        loss, diagnostics = trainer.loss(images, LABELS)
        assert torch.isfinite(loss) and "reg_text" in diagnostics and "learner_loss" in diagnostics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = learner.learned_state()
    for name in ("rep_tokens", "proj_rep", "text_proj_w.0", "vision_proj_w.0"):
        assert (after[name] - before[name]).abs().max() > 0, name


def test_presets_carry_the_published_configuration():
    from promptbench_vlm.presets import PRESETS

    preset = PRESETS["mmrl-b2n"]
    assert (preset.method, preset.learner) == ("erm", "mmrl") and "configs/trainers/MMRL/vit_b16.yaml" in preset.source
    assert preset.learner_options == {"n_rep_tokens": 5, "rep_dim": 512, "first_layer": 6, "alpha": 0.7,
                                      "reg_weight": 1.0}
    assert (preset.train["epochs"], preset.train["batch_size"], preset.train["lr"]) == (10, 4, 0.001)
    assert PRESETS["promise-mmrl-b2n"].learner == "mmrl"
