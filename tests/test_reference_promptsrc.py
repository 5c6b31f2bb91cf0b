"""PromptSRC's losses equal a hand computation of the reference formulas (trainers/promptsrc.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptbench_vlm.backbone import load_backbone
from promptbench_vlm.learners import build_learner
from promptbench_vlm.templates import load_templates
from promptbench_vlm.train.method import METHODS, build_method
from promptbench_vlm.train.promptsrc import gaussian_epoch_weights
from promptbench_vlm.train.run import TrainRequest, learner_options

from reference_clip import TINY_CONFIG, write_openai_file

CLASSES = ["golden retriever", "red car", "tree"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = write_openai_file(tmp_path_factory.mktemp("openai") / "tiny-openai.pt")
    return load_backbone(str(TINY_CONFIG), pretrained=str(path), device="cpu")


def test_promptsrc_loss_terms_are_the_reference_formulas(backbone):
    torch.manual_seed(0)
    learner = build_learner("ivlp", backbone, {"n_ctx": 4, "n_ctx_v": 4, "depth": 2, "depth_v": 2})
    method = build_method("promptsrc", learner, CLASSES)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 2, 1, 0])
    loss, parts = method.loss(images, labels)

    clip = backbone.model
    with torch.no_grad():
        # fixed_embeddings: mean over the templates of the raw frozen features, normalised after
        raw = []
        for name in CLASSES:
            ids = backbone.tokenizer([t.replace("{}", name) for t in load_templates("promptsrc60").templates])
            raw.append(clip.encode_text(ids).mean(0))
        fixed = F.normalize(torch.stack(raw), dim=-1)
        zs_image = F.normalize(clip.encode_image(images), dim=-1)
        scale = clip.logit_scale.exp()
        zs_logits = scale * zs_image @ fixed.T
        text = learner.encode_texts([f"{c}." for c in CLASSES])
        image = learner.encode_images(images)
        logits = scale * image @ text.T
        ce = F.cross_entropy(logits, labels)
        l_text = (text - fixed).abs().mean() * 25
        l_image = (image - zs_image).abs().mean() * 10
        p_zs = F.softmax(zs_logits, 1)
        kl = (p_zs * (F.log_softmax(zs_logits, 1) - F.log_softmax(logits, 1))).sum() / logits.numel()
    for key, want in {"ce": ce, "l1_text": l_text, "l1_image": l_image, "kl": kl}.items():
        assert parts[key] == pytest.approx(float(want), rel=1e-5, abs=1e-7), key
    assert float(loss.detach()) == pytest.approx(float(ce + l_text + l_image + kl), rel=1e-5)
    # the old target (normalise each template's feature, then average) is measurably different
    per_template = F.normalize(torch.stack([F.normalize(clip.encode_text(backbone.tokenizer(
        [t.replace("{}", n) for t in load_templates("promptsrc60").templates])), dim=-1).mean(0) for n in CLASSES]),
        dim=-1)
    assert (per_template - fixed).abs().max() > 1e-4


def test_promptsrc_defaults_are_the_base_to_new_config(backbone):
    """vit_b16_c2_ep20_batch4_4+4ctx.yaml: 4 + 4 tokens, lr 0.0025, GPA mean 15 / std 1."""
    request = TrainRequest(method="promptsrc", learner="ivlp", learner_options={"depth": 2})
    options = learner_options(request, CLASSES, CLASSES)
    assert options == {"n_ctx": 4, "n_ctx_v": 4, "depth": 2}
    assert METHODS.get("promptsrc").lr == 0.0025
    user = learner_options(TrainRequest(method="promptsrc", learner="ivlp", learner_options={"n_ctx": 2}), [], [])
    assert user["n_ctx"] == 2  # the user's option wins
    learner = build_learner("ivlp", backbone, {"depth": 1, "depth_v": 1, "n_ctx": 4, "n_ctx_v": 4})
    method = build_method("promptsrc", learner, CLASSES)
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.zero_()
    for epoch in range(1, 21):  # epoch e's prompts all equal e: the aggregate is sum w_e * e
        with torch.no_grad():
            for p in learner.parameters():
                if p.requires_grad:
                    p.fill_(float(epoch))
        method.on_epoch_end(epoch, 20)
    method.finish()
    weights = gaussian_epoch_weights(20, 15, 1)
    want = sum(w * e for w, e in zip(weights, range(1, 21)))
    assert max(range(20), key=weights.__getitem__) == 14  # epoch 15 weighs most
    assert float(learner.text_prompts[0][0, 0].detach()) == pytest.approx(want, rel=1e-6)


def test_anprompt_keeps_the_learners_own_token_counts():
    request = TrainRequest(method="anprompt", learner="ivlp")
    assert learner_options(request, CLASSES, CLASSES) == {}
