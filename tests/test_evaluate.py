"""The Evaluator against direct computation, encode-once, streaming and corrupt images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptbench_vlm import evaluate as ev
from promptbench_vlm.evaluate import EvalSettings, Evaluator
from promptbench_vlm.learners import build_learner
from promptbench_vlm.learners.zeroshot import ZeroShotLearner
from promptbench_vlm.perturb import fill_template, load_lexicon, parse_perturbations
from promptbench_vlm.prompts import build_prompt_table

TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.", "a sketch of a {}.", "itap of the {}.")


class CountingLearner:
    """Wraps a learner's encoders to count how many images and texts they see."""

    def __init__(self, learner):
        self.images = 0
        self.texts: list[str] = []
        enc_i, enc_t = learner.encode_images, learner.encode_texts

        def encode_images(x):
            self.images += x.shape[0]
            return enc_i(x)

        def encode_texts(texts, image_features=None):
            self.texts += texts
            return enc_t(texts)

        learner.encode_images = encode_images
        learner.encode_texts = encode_texts


def direct_scores(learner, dataset, templates):
    """[T, N, C] logits the naive way, for comparison (only fine on tiny data)."""
    preprocess = learner.backbone.preprocess
    with torch.no_grad():
        images = torch.stack([preprocess(dataset.load(i)) for i in range(len(dataset))])
        v = learner.encode_images(images)
        u = torch.stack([learner.encode_texts([t.replace("{}", c) for c in dataset.classnames]) for t in templates])
        logits = learner.logit_scale * torch.einsum("nd,tcd->tnc", v, u)
    return logits, v, u


@pytest.fixture
def zeroshot(tiny_backbone):
    return build_learner("zeroshot", tiny_backbone)


def test_clean_metrics_match_direct_computation(zeroshot, colour_dataset):
    settings = EvalSettings(templates=TEMPLATES, bootstrap=0)
    result = Evaluator(zeroshot, settings).run(colour_dataset)
    logits, v, u = direct_scores(zeroshot, colour_dataset, TEMPLATES)
    labels = torch.tensor(colour_dataset.labels)
    acc = (logits.argmax(2) == labels).float().mean(1) * 100
    np.testing.assert_allclose(result.per_template_acc, acc.numpy(), atol=1e-4)
    p_true = logits.softmax(2)[:, torch.arange(len(labels)), labels]
    assert result.metrics["sensitivity"].value == pytest.approx(p_true.var(0, unbiased=False).mean().item(), abs=1e-6)
    ens = torch.nn.functional.normalize(u.mean(0), dim=-1)
    ens_acc = ((v @ ens.T).argmax(1) == labels).float().mean().item() * 100
    assert result.metrics["ensemble_acc"].value == pytest.approx(ens_acc, abs=1e-4)


def test_streaming_in_small_blocks_gives_the_same_scores(zeroshot, colour_dataset, monkeypatch):
    settings = EvalSettings(templates=TEMPLATES, perturbations=tuple(parse_perturbations("drop:strong")), bootstrap=0)
    whole = Evaluator(zeroshot, settings).run(colour_dataset)
    monkeypatch.setattr(ev, "LOGIT_BLOCK_ELEMENTS", 5)  # forces blocks of 1 image x 1 template
    blocked = Evaluator(zeroshot, settings).run(colour_dataset)
    assert blocked.per_template_acc == whole.per_template_acc
    assert blocked.metrics["sensitivity"].value == pytest.approx(whole.metrics["sensitivity"].value, abs=1e-7)
    assert blocked.perturbations[0].metrics["LPR"].value == whole.perturbations[0].metrics["LPR"].value
    assert blocked.perturbations[0].metrics["JSD"].value == pytest.approx(whole.perturbations[0].metrics["JSD"].value,
                                                                          abs=1e-7)


def test_tied_logits_predict_the_first_class_as_argmax_does():
    """Predictions come from `max(-1).indices`; on ties they must be argmax's: the first class."""
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    u[:, 3] = u[:, 1]  # classes 1 and 3 tie everywhere
    u[:, 2] = u[:, 0]
    logits = 100.0 * torch.einsum("nd,bcd->bnc", v, u)
    clean = ev.score_templates(v, torch.zeros(6, dtype=torch.long), u, 100.0)
    assert np.array_equal(clean.pred, logits.argmax(2).numpy()) and not np.isin(clean.pred, [2, 3]).any()
    (pred, divergence), = ev.score_perturbed(v, [lambda a, b: u[a:b]], 2, 4, 100.0, u)
    assert np.array_equal(pred, clean.pred)
    assert np.allclose(divergence, 0.0, atol=1e-6)  # a set against itself


def test_encode_once(zeroshot, colour_dataset):
    specs = tuple(parse_perturbations("default"))
    draws = 2
    counter = CountingLearner(zeroshot)
    settings = EvalSettings(templates=TEMPLATES, perturbations=specs, draws=draws, bootstrap=0, batch_size=5)
    result = Evaluator(zeroshot, settings).run(colour_dataset)
    assert counter.images == len(colour_dataset)
    assert len(counter.texts) == len(set(counter.texts))
    expected = {fill_template(t, c)[0] for t in TEMPLATES for c in colour_dataset.classnames}
    table = build_prompt_table(TEMPLATES, colour_dataset.classnames, specs, draws, 0, load_lexicon())
    assert set(counter.texts) == set(table.texts) >= expected
    assert result.counts == {"images_encoded": len(colour_dataset), "texts_encoded": len(set(counter.texts))}
    assert len(result.perturbations) == len(specs)


def test_perturbation_metrics_are_consistent(zeroshot, colour_dataset):
    settings = EvalSettings(templates=TEMPLATES, perturbations=tuple(parse_perturbations("mask:strong")), bootstrap=50)
    result = Evaluator(zeroshot, settings).run(colour_dataset)
    m = result.perturbations[0].metrics
    assert m["AS"].value == pytest.approx(result.metrics["acc_mean"].value - m["acc_pert"].value, abs=1e-6)
    assert 0 <= m["LPR"].value <= 100
    assert m["TS"].value > 0  # masking half the words moves the text features
    lo, hi = result.metrics["acc_mean"].ci
    assert lo <= result.metrics["acc_mean"].value <= hi


def test_divergence_and_edits_match_direct_computation(zeroshot, colour_dataset):
    from scipy.spatial.distance import jensenshannon

    specs = tuple(parse_perturbations("drop:strong,shuffle:0"))
    result = Evaluator(zeroshot, EvalSettings(templates=TEMPLATES, perturbations=specs, bootstrap=0)).run(colour_dataset)
    table = build_prompt_table(TEMPLATES, colour_dataset.classnames, specs, 1, 0, load_lexicon())
    clean_logits, v, _ = direct_scores(zeroshot, colour_dataset, TEMPLATES)
    with torch.no_grad():
        u = torch.stack([zeroshot.encode_texts([table.texts[i] for i in row]) for row in table.perturbed[0][:, 0]])
        pert_logits = zeroshot.logit_scale * torch.einsum("nd,tcd->tnc", v, u)
    p, q = clean_logits.softmax(2).double().numpy(), pert_logits.softmax(2).double().numpy()
    expected = np.mean(jensenshannon(p, q, axis=2) ** 2)  # scipy gives the distance, the root of the divergence
    dropped, identity = (r.metrics for r in result.perturbations)
    assert dropped["JSD"].value == pytest.approx(expected, rel=1e-4, abs=1e-7) and dropped["JSD"].value > 0
    assert dropped["edits"].value == pytest.approx(table.edits[0].mean()) and dropped["edits"].value >= 2
    assert identity["JSD"].value == pytest.approx(0.0, abs=1e-7)  # float32 rounding of equal distributions
    assert (identity["LPR"].value, identity["edits"].value) == (100.0, 0.0)
    assert identity["unchanged_frac"].value == 1.0
    counts = result.per_image["perturbations"]["drop:strong"]["divergence"]
    assert np.mean(counts) == pytest.approx(dropped["JSD"].value, abs=1e-7)


def test_corrupt_images_are_skipped_and_counted(zeroshot):
    from conftest import ColourDataset

    dataset = ColourDataset(corrupt=(1, 5))
    result = Evaluator(zeroshot, EvalSettings(templates=TEMPLATES, bootstrap=0)).run(dataset)
    assert result.n_images == len(dataset) - 2
    assert [s["item"] for s in result.skipped] == ["colours/1", "colours/5"]


class ConditionalLearner(ZeroShotLearner):
    """Zero-shot text features nudged towards each image: u(x) = normalise(u + mix * v(x))."""

    name = "conditional-test"
    conditional = True
    mix = 0.5

    def encode_texts(self, texts, image_features=None):
        base = super().encode_texts(texts)
        if image_features is None:
            return base
        return torch.nn.functional.normalize(base[None] + self.mix * image_features[:, None], dim=-1)


def test_conditional_learner_that_ignores_the_image_matches_the_shared_path(tiny_backbone, colour_dataset):
    settings = EvalSettings(templates=TEMPLATES, perturbations=tuple(parse_perturbations("drop:strong,mask")),
                            draws=2, bootstrap=0, text_batch_size=40)
    shared = Evaluator(build_learner("zeroshot", tiny_backbone), settings).run(colour_dataset)
    learner = ConditionalLearner(tiny_backbone)
    learner.mix = 0.0
    conditional = Evaluator(learner, settings).run(colour_dataset)
    assert conditional.per_template_acc == shared.per_template_acc
    assert conditional.metrics["sensitivity"].value == pytest.approx(shared.metrics["sensitivity"].value, abs=1e-6)
    assert conditional.metrics["ensemble_acc"].value == shared.metrics["ensemble_acc"].value
    for a, b in zip(conditional.perturbations, shared.perturbations):
        assert a.metrics["LPR"].value == b.metrics["LPR"].value
        assert a.metrics["JSD"].value == pytest.approx(b.metrics["JSD"].value, abs=1e-6)
        assert a.metrics["TS"].value == pytest.approx(b.metrics["TS"].value, abs=1e-5)


def test_conditional_scores_match_direct_per_image_computation(tiny_backbone, colour_dataset):
    learner = ConditionalLearner(tiny_backbone)
    result = Evaluator(learner, EvalSettings(templates=TEMPLATES, bootstrap=0, text_batch_size=8)).run(colour_dataset)
    preprocess = tiny_backbone.preprocess
    with torch.no_grad():
        v = learner.encode_images(torch.stack([preprocess(colour_dataset.load(i)) for i in range(len(colour_dataset))]))
        labels = torch.tensor(colour_dataset.labels)
        acc = []
        for t in TEMPLATES:
            u = learner.encode_texts([t.replace("{}", c) for c in colour_dataset.classnames], image_features=v)
            acc.append(((torch.einsum("nd,ncd->nc", v, u)).argmax(1) == labels).float().mean().item() * 100)
    np.testing.assert_allclose(result.per_template_acc, acc, atol=1e-4)
    n_strings = len(TEMPLATES) * len(colour_dataset.classnames)
    assert result.counts["texts_encoded"] == len(colour_dataset) * n_strings  # per image, each string once
