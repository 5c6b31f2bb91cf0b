"""ANPrompt on tiny models: noise clustering, where the anti-noise prompts act, WALoss, the
ablation switches, checkpoints and one end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, TINY_CONFIG, write_train_test_folders
from scipy.special import rel_entr, softmax

from promptbench_vlm.backbone import Backbone, load_backbone
from promptbench_vlm.errors import UserError
from promptbench_vlm.learners import build_learner, load_learner_checkpoint
from promptbench_vlm.learners import text as text_side
from promptbench_vlm.learners.anprompt import ANPromptMaPLe, add_anti_noise
from promptbench_vlm.train.anprompt import cluster_noise, noise_sentences, wa_loss
from promptbench_vlm.train.loop import TrainConfig
from promptbench_vlm.train.method import build_method
from promptbench_vlm.train.run import TrainRequest, run_training

CLASSES = list(COLOURS)


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory) -> Backbone:
    """A 4-layer tiny CLIP, so that 'the last two layers' leave two layers before them."""
    config = json.loads(TINY_CONFIG.read_text())
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = 4
    path = tmp_path_factory.mktemp("deep") / "tiny-deep.json"
    path.write_text(json.dumps(config))
    return load_backbone(str(path), device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def method_for(backbone: Backbone, learner: str = "maple", **options):
    """A freshly seeded learner and its anprompt method (identical for identical arguments)."""
    torch.manual_seed(0)
    return build_method("anprompt", build_learner(learner, backbone), CLASSES, options)


def block_inputs(blocks: torch.nn.ModuleList, run) -> list[torch.Tensor]:
    """Each block's input tokens during `run()`, recorded with forward hooks."""
    inputs: list = [None] * len(blocks)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].clone()))
               for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return inputs


# --- noise prompts ------------------------------------------------------------------------


def test_clustering_is_deterministic_and_gives_k_normalised_centres():
    features = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    a, b = cluster_noise(features, 5, seed=3), cluster_noise(features, 5, seed=3)
    assert a.shape == (5, 8) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5))
    with pytest.raises(UserError, match="at least 5 distinct"):
        cluster_noise(features[:2].repeat(4, 1), 5, seed=3)


def test_method_fills_k_noise_prompts_deterministically(tiny_backbone):
    first = method_for(tiny_backbone, clusters=3, cluster_seed=7).learner
    second = method_for(tiny_backbone, clusters=3, cluster_seed=7).learner
    assert first.name == "anprompt-maple" and first.options["clusters"] == 3
    assert first.anti_noise.noise.shape == (3, 32) and first.anti_noise.noise.abs().sum() > 0
    assert torch.equal(first.anti_noise.noise, second.anti_noise.noise)
    assert [p.shape[0] for p in first.anti_noise.layer_prompts("text")] == [3 + 2]


def test_noise_sentences_are_weakly_perturbed_and_keep_the_class():
    main, noisy = noise_sentences("a photo of a {}.", ["red circle"], ("context", "synonym"), 0.1, draws=3)
    assert main == ["a photo of a red circle."]
    assert len(noisy) == 3 and all("red circle" in s[0] and s[0] != main[0] for s in noisy)
    assert noisy == noise_sentences("a photo of a {}.", ["red circle"], ("context", "synonym"), 0.1, draws=3)[1]


# --- where the anti-noise prompts act -----------------------------------------------------


@pytest.mark.parametrize("name", ["ivlp", "maple"])
def test_anti_noise_prompts_change_only_the_last_two_layers(deep_backbone, images, name):
    torch.manual_seed(0)
    learner = build_learner(name, deep_backbone)
    towers = {"text": (deep_backbone.model.transformer.resblocks, lambda: learner.encode_texts(["red.", "a blue."])),
              "image": (deep_backbone.model.visual.transformer.resblocks, lambda: learner.encode_images(images))}
    before = {t: block_inputs(blocks, run) for t, (blocks, run) in towers.items()}
    add_anti_noise(learner, clusters=3, anti_tokens=2, anti_layers=2)
    learner.anti_noise.noise.copy_(F.normalize(torch.randn(3, 32), dim=-1))
    after = {t: block_inputs(blocks, run) for t, (blocks, run) in towers.items()}
    for tower in towers:
        old, new = before[tower], after[tower]
        assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
        length = old[2].shape[1]
        assert new[2].shape[1] == new[3].shape[1] == length + 5  # K + anti_tokens extra tokens
        assert torch.equal(new[2][:, :length], old[2])  # block 2: the same tokens, extras appended
        assert not torch.allclose(new[3][:, :length], old[3])  # block 3 sees what the extras did


@pytest.mark.parametrize("depth", [2, 4])
def test_tail_extras_compute_exactly_an_insertion_after_sos(deep_backbone, depth):
    """The extras sit at the end with a permuted causal mask: the same as inserting them.
    (At depth 2 the context tokens flow on into the extras' layers, so their order matters.)"""
    torch.manual_seed(0)
    learner = build_learner("anprompt-ivlp", deep_backbone, {"depth": depth})
    learner.anti_noise.noise.copy_(F.normalize(torch.randn(4, 32), dim=-1))
    texts = ["red.", "a very dark blue square."]
    with torch.no_grad():
        got = learner.encode_texts(texts)
        clip, n = deep_backbone.model, learner.n_ctx
        batch = text_side.prepare(clip, learner.tokenize(texts), n, learner.fixed)  # "of a" stays fixed
        x = torch.cat([batch.tokens[:, :1], learner.text_prompts[0].expand(2, -1, -1), batch.tokens[:, 1 + n :]], 1)
        x = x + clip.positional_embedding[: x.shape[1]]  # prepare trims after the last EOS
        extras = learner.anti_noise.layer_prompts("text")
        m = extras[0].shape[0]
        for i, block in enumerate(clip.transformer.resblocks):
            shift = m if i >= 3 else 0  # extras enter at block 2 (below: inserted at position 1)
            if 1 <= i < len(learner.text_prompts):
                x = torch.cat([x[:, : 1 + shift], learner.text_prompts[i].expand(2, -1, -1), x[:, 1 + shift + n :]], 1)
            if i == 2:
                x = torch.cat([x[:, :1], extras[0].expand(2, -1, -1), x[:, 1:]], 1)
            elif i == 3:
                x = torch.cat([x[:, :1], extras[1].expand(2, -1, -1), x[:, 1 + m :]], 1)
            mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
            x = block(x, attn_mask=mask)
        reference = clip.ln_final(x[torch.arange(2), batch.eos + m]) @ clip.text_projection
    assert (got - F.normalize(reference, dim=-1)).abs().max() <= 1e-5


def test_checkpoint_rebuilds_the_anti_noise_learner(tiny_backbone, images, tmp_path):
    learner = method_for(tiny_backbone).learner
    with torch.no_grad():
        learner.anti_noise.tokens["vision"][0].add_(1.0)
        expected = learner.encode_images(images), learner.encode_texts(["a red."])
    loaded = load_learner_checkpoint(learner.save(tmp_path / "a.safetensors"), tiny_backbone)
    assert isinstance(loaded, ANPromptMaPLe) and loaded.options == learner.options
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(images), expected[0], atol=1e-6)
        assert torch.allclose(loaded.encode_texts(["a red."]), expected[1], atol=1e-6)


# --- WALoss --------------------------------------------------------------------------------


def test_waloss_is_zero_for_equal_predictions_and_positive_otherwise():
    clean = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert wa_loss(clean, clean).item() == pytest.approx(0, abs=1e-7)
    assert wa_loss(clean + 3.0, clean).item() == pytest.approx(0, abs=1e-6)  # same softmax
    noisy = clean + 0.3 * torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert wa_loss(noisy, clean).item() > 0


@pytest.mark.parametrize("spread", [0.5, 1.0, 4.0])
def test_waloss_is_kl_over_the_clean_logit_spread(spread):
    rng = np.random.default_rng(0)
    clean, noisy = spread * rng.normal(size=(3, 6)), spread * rng.normal(size=(3, 6))
    kl = rel_entr(softmax(noisy, axis=1), softmax(clean, axis=1)).sum(axis=1)
    expected = (kl / (clean.std(axis=1) + 1e-6)).mean()
    got = wa_loss(torch.tensor(noisy), torch.tensor(clean)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    for row in range(3):  # per image: the KL divided by that image's clean-logit spread
        single = wa_loss(torch.tensor(noisy[row : row + 1]), torch.tensor(clean[row : row + 1])).item()
        assert single * (clean[row].std() + 1e-6) == pytest.approx(kl[row], rel=1e-5)


def test_waloss_std_is_a_constant_weight_unless_asked():
    clean = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    noisy = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad(wa_loss(noisy, clean, detach_std=d), clean)[0] for d in (True, False)]
    std = clean.detach().std(dim=-1, unbiased=False, keepdim=True) + 1e-6
    plain = clean.detach().requires_grad_(True)
    log_p = F.log_softmax(noisy, -1)
    kl = (log_p.exp() * (log_p - F.log_softmax(plain, -1))).sum(-1, keepdim=True)
    (reference,) = torch.autograd.grad((kl / std).mean(), plain)
    assert torch.allclose(grads[0], reference, atol=1e-6) and not torch.allclose(grads[1], reference)


# --- switches ------------------------------------------------------------------------------


def terms_of(method, images: torch.Tensor) -> tuple[dict[str, float], float]:
    loss, diagnostics = method.loss(images, torch.arange(len(CLASSES)))
    return {k: v for k, v in diagnostics.items() if k != "acc"}, loss.item()


def test_every_switch_removes_its_component(tiny_backbone, images):
    full = method_for(tiny_backbone)
    terms, loss = terms_of(full, images)
    assert set(terms) == {"ce", "nrvpp", "waloss", "sim_text", "sim_image"} and all(v > 0 for v in terms.values())
    assert loss == pytest.approx(sum(terms.values()), rel=1e-6)
    for option, term in [("nrvpp", "nrvpp"), ("waloss", "waloss"), ("text_weight", "sim_text"),
                         ("image_weight", "sim_image")]:
        ablated, ablated_loss = terms_of(method_for(tiny_backbone, **{option: 0 if "weight" in option else False}),
                                         images)
        assert term not in ablated and ablated_loss == pytest.approx(loss - terms[term], rel=1e-5), option
    plain = method_for(tiny_backbone, noise_prompts=False)
    plain_terms, plain_loss = terms_of(plain, images)
    assert plain.learner.name == "maple" and not hasattr(plain.learner, "anti_noise")
    assert plain.options["clusters"] is None and plain_loss != pytest.approx(loss)
    assert set(plain_terms) == set(terms)  # NRVPP then averages the learner's own vision prompts
    anti = sum(p.numel() for p in full.learner.anti_noise.parameters())
    count = sum(p.numel() for p in full.trainable_parameters())
    assert count - sum(p.numel() for p in plain.trainable_parameters()) == anti > 0
    assert method_for(tiny_backbone, clusters=2).learner.anti_noise.noise.shape[0] == 2


def test_noise_prompts_and_anti_noise_parameters_receive_gradients(tiny_backbone, images):
    method = method_for(tiny_backbone, "ivlp")
    loss, _ = method.loss(images, torch.arange(len(CLASSES)))
    loss.backward()
    anti = method.learner.anti_noise
    assert anti.noise.grad is None and not anti.noise.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in anti.parameters())
    assert all(p.grad is None for p in method.learner.clip.parameters())


def test_bad_combinations_fail_clearly(tiny_backbone):
    with pytest.raises(UserError, match="noise_prompts=false but learner 'anprompt-maple'"):
        build_method("anprompt", build_learner("anprompt-maple", tiny_backbone), CLASSES, {"noise_prompts": False})
    with pytest.raises(UserError, match="differ from the learner's own"):
        build_method("anprompt", build_learner("anprompt-maple", tiny_backbone), CLASSES, {"clusters": 3})
    with pytest.raises(UserError, match="no 'all' vision prompt tokens"):
        build_method("anprompt", build_learner("ivlp", tiny_backbone, {"n_ctx_v": 0}), CLASSES,
                     {"noise_prompts": False})
    with pytest.raises(UserError, match="cannot train learner 'coop': it lacks the capability 'layer_prompts'"):
        build_method("anprompt", build_learner("coop", tiny_backbone), CLASSES)


# --- end to end ----------------------------------------------------------------------------


def test_train_run_saves_and_scores_the_anti_noise_learner(tmp_path):
    root = tmp_path / "colours"
    write_train_test_folders(root, train=4, test=2)
    request = TrainRequest(method="anprompt", learner="maple", model=str(TINY_CONFIG), dataset=f"folder:{root}",
                           shots=4, output=str(tmp_path / "run"), method_options={"clusters": 2},
                           config=TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, seed=2),
                           eval_templates="single", eval_perturb="synonym:weak", bootstrap=0, device="cpu",
                           fewshot_cache=None)
    doc = run_training(request, {})
    assert doc["run"]["learner"] == "anprompt-maple" and doc["run"]["learner_options"]["clusters"] == 2
    assert doc["run"]["training"]["lr"] == 0.0035
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "nrvpp", "waloss", "sim_text", "sim_image"} <= set(log[0])
    loaded = load_learner_checkpoint(Path(doc["run"]["checkpoint"]))
    assert loaded.name == "anprompt-maple" and loaded.anti_noise.noise.abs().sum() > 0
