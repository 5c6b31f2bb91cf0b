"""Metrics against hand computations on small arrays, and the bootstrap's behaviour."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from promptbench_vlm import metrics
from promptbench_vlm.metrics import (
    Estimate,
    accuracy,
    bootstrap_mean_ci,
    clean_metrics,
    harmonic_mean,
    per_image_clean,
    per_image_perturbation,
    per_template_accuracy,
    perturbation_metrics,
)

# Clean case: T = 3 templates, N = 4 images.
LABELS = np.array([0, 1, 2, 0])
PRED = np.array(
    [
        [0, 1, 2, 0],  # 4/4 correct -> 100
        [0, 1, 0, 1],  # 2/4 -> 50
        [1, 1, 2, 0],  # 3/4 -> 75
    ]
)
# Image 0 varies over templates (0.2, 0.4, 0.6: variance 0.08 / 3); the others are constant.
P_TRUE = np.array(
    [
        [0.2, 0.5, 0.1, 0.9],
        [0.4, 0.5, 0.1, 0.9],
        [0.6, 0.5, 0.1, 0.9],
    ]
)
# Image 1 varies (0.1, 0.3, 0.5: variance 0.08 / 3); the others are constant.
COS_TRUE = np.array(
    [
        [0.3, 0.1, 0.2, 0.2],
        [0.3, 0.3, 0.2, 0.2],
        [0.3, 0.5, 0.2, 0.2],
    ]
)
PRED_ENS = np.array([0, 1, 1, 0])  # 3/4 -> 75

# Perturbation case: T = 2, R = 2, N = 3, C = 2.
P_LABELS = np.array([0, 1, 2])
P_PRED = np.array([[0, 1, 2], [0, 1, 0]])  # acc 100, 66.67; per image 100, 100, 50
P_PRED_PERT = np.array(
    [
        [[0, 1, 1], [0, 0, 2]],  # t0: 2/3 and 2/3 correct; agree with [0, 1, 2]: 2 and 2
        [[0, 1, 0], [1, 1, 2]],  # t1: 2/3 and 2/3 correct; agree with [0, 1, 0]: 3 and 1
    ]
)
TEXT_COS = np.array([[[1.0, 0.8], [0.9, 1.0]], [[1.0, 1.0], [0.6, 0.9]]])  # 1 - cos sums to 0.8 over 8
UNCHANGED = np.array([[[True, False], [False, True]], [[True, True], [False, False]]])  # 4 of 8


def test_accuracy_and_per_template_accuracy():
    assert accuracy(PRED_ENS, LABELS) == 75.0
    np.testing.assert_allclose(per_template_accuracy(PRED, LABELS), [100.0, 50.0, 75.0])


def test_clean_accuracy_summaries():
    m = clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, n_resamples=0)
    assert m["acc_mean"].value == pytest.approx(75.0)
    assert m["acc_std"].value == pytest.approx(math.sqrt((25.0**2 + 25.0**2 + 0.0) / 3))  # ddof = 0
    assert m["acc_min"].value == 50.0
    assert m["acc_max"].value == 100.0
    assert m["acc_spread"].value == 50.0


def test_sensitivity_known_variance():
    m = clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, n_resamples=0)
    assert m["sensitivity"].value == pytest.approx((0.08 / 3) / 4)
    assert m["sensitivity_cos"].value == pytest.approx((0.08 / 3) / 4)


def test_sensitivity_zero_when_templates_agree():
    p_true = np.tile([0.3, 0.7, 0.9, 0.1], (3, 1))
    m = clean_metrics(PRED, p_true, p_true, LABELS, n_resamples=0)
    assert m["sensitivity"].value == pytest.approx(0.0, abs=1e-12)  # mean of equal floats may round
    assert m["sensitivity_cos"].value == pytest.approx(0.0, abs=1e-12)


def test_flip_rate_and_ensemble_acc():
    m = clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, PRED_ENS, n_resamples=0)
    # Images 0 (0, 0, 1), 2 (2, 0, 2) and 3 (0, 1, 0) flip; image 1 (1, 1, 1) does not.
    assert m["flip_rate"].value == pytest.approx(0.75)
    assert m["ensemble_acc"].value == 75.0
    assert "ensemble_acc" not in clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, n_resamples=0)


def test_clean_intervals_only_on_headline_metrics():
    m = clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, PRED_ENS, n_resamples=200)
    assert {k for k, v in m.items() if v.ci is not None} == {"acc_mean", "sensitivity"}
    assert all(v.ci is None for v in clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, n_resamples=0).values())


def test_perturbation_metrics_by_hand():
    m = perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, n_resamples=0)
    acc_mean = (100.0 + 200.0 / 3) / 2
    assert m["acc_pert"].value == pytest.approx(8 / 12 * 100)
    assert m["AS"].value == pytest.approx(acc_mean - 8 / 12 * 100)
    assert m["AS"].value > 0  # this perturbation hurts
    assert m["LPR"].value == pytest.approx((2 + 2 + 3 + 1) / 12 * 100)
    assert m["TS"].value == pytest.approx(0.8 / 8)
    assert m["PDR"].value == pytest.approx(1 - (4 * 200.0 / 3) / (2 * (100.0 + 200.0 / 3)))
    assert m["unchanged_frac"].value == 0.5
    assert all(v.ci is None for v in m.values())


def test_divergence_and_edits_by_hand():
    divergence = np.array([[[0.1, 0.0, 0.3], [0.1, 0.2, 0.3]], [[0.0, 0.0, 0.3], [0.2, 0.2, 0.3]]])  # [T, R, N]
    edits = np.array([[[1, 2], [1, 0]], [[3, 1], [2, 2]]])  # [T, R, C]
    m = perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, divergence=divergence,
                             edits=edits, n_resamples=200)
    per_image = per_image_perturbation(P_PRED, P_PRED_PERT, P_LABELS, divergence)["JSD"]
    np.testing.assert_allclose(per_image, [0.1, 0.1, 0.3])  # mean over t and r of each image
    assert m["JSD"].value == pytest.approx(0.5 / 3) and m["JSD"].ci[0] <= m["JSD"].value <= m["JSD"].ci[1]
    assert m["edits"].value == pytest.approx(12 / 8) and m["edits"].ci is None
    assert "JSD" not in perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, n_resamples=0)
    with pytest.raises(ValueError, match="divergence"):
        perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, divergence=divergence[:1])
    with pytest.raises(ValueError, match="edits"):
        perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, edits=edits[:, :1])


def test_identical_perturbation_is_neutral():
    pred_pert = np.repeat(P_PRED[:, None, :], 3, axis=1)
    m = perturbation_metrics(P_PRED, pred_pert, P_LABELS, np.ones((2, 3, 2)), np.ones((2, 3, 2), bool), n_resamples=0)
    assert m["LPR"].value == 100.0
    assert m["AS"].value == 0.0
    assert m["PDR"].value == 0.0
    assert m["TS"].value == 0.0
    assert m["unchanged_frac"].value == 1.0


def test_pdr_zero_when_clean_accuracy_is_zero():
    wrong = (P_LABELS + 1) % 3
    pred = np.tile(wrong, (2, 1))
    m = perturbation_metrics(pred, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, n_resamples=0)
    assert m["PDR"].value == 0.0


def test_perturbation_intervals():
    m = perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, n_resamples=200)
    assert {k for k, v in m.items() if v.ci is not None} == {"acc_pert", "AS", "LPR"}


def test_per_image_vectors_by_loops():
    clean = per_image_clean(PRED, P_TRUE, LABELS)
    pert = per_image_perturbation(P_PRED, P_PRED_PERT, P_LABELS)
    for n in range(len(LABELS)):
        correct = [PRED[t, n] == LABELS[n] for t in range(3)]
        assert clean["acc_mean"][n] == pytest.approx(100 * sum(correct) / 3)
        mu = sum(P_TRUE[t, n] for t in range(3)) / 3
        assert clean["sensitivity"][n] == pytest.approx(sum((P_TRUE[t, n] - mu) ** 2 for t in range(3)) / 3)
    for n in range(len(P_LABELS)):
        clean_acc = 100 * sum(P_PRED[t, n] == P_LABELS[n] for t in range(2)) / 2
        pert_acc = 100 * sum(P_PRED_PERT[t, r, n] == P_LABELS[n] for t in range(2) for r in range(2)) / 4
        agree = 100 * sum(P_PRED_PERT[t, r, n] == P_PRED[t, n] for t in range(2) for r in range(2)) / 4
        assert pert["acc_pert"][n] == pytest.approx(pert_acc)
        assert pert["AS"][n] == pytest.approx(clean_acc - pert_acc)
        assert pert["LPR"][n] == pytest.approx(agree)
    # Headline metrics are the means of these vectors.
    m = perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS, UNCHANGED, n_resamples=0)
    for key in ("acc_pert", "AS", "LPR"):
        assert m[key].value == pytest.approx(pert[key].mean())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        per_template_accuracy(PRED, LABELS[:3])
    with pytest.raises(ValueError):
        clean_metrics(PRED, P_TRUE[:2], COS_TRUE, LABELS, n_resamples=0)
    with pytest.raises(ValueError):
        perturbation_metrics(P_PRED, P_PRED_PERT, P_LABELS, TEXT_COS[:, :1], UNCHANGED, n_resamples=0)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(70.0, 70.0) == pytest.approx(70.0)
    assert harmonic_mean(50.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_estimate_to_dict():
    assert Estimate(1.5, (1.0, 2.0)).to_dict() == {"value": 1.5, "ci": [1.0, 2.0]}
    assert Estimate(np.float64(3.0)).to_dict() == {"value": 3.0, "ci": None}


def _coin(n: int, seed: int = 1) -> np.ndarray:
    """Per-image accuracies of a 70 %-accurate classifier: 0 or 100."""
    return 100.0 * (np.random.default_rng(seed).random(n) < 0.7)


def test_bootstrap_contains_estimate_and_shrinks_with_n():
    small, large = _coin(100), _coin(10_000)
    lo_s, hi_s = bootstrap_mean_ci(small, n_resamples=500)
    lo_l, hi_l = bootstrap_mean_ci(large, n_resamples=500)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1 / sqrt(N): expect ~1/10


def test_bootstrap_reproducible_for_seed():
    x = _coin(300)
    assert bootstrap_mean_ci(x, n_resamples=300, seed=7) == bootstrap_mean_ci(x, n_resamples=300, seed=7)
    assert bootstrap_mean_ci(x, n_resamples=300, seed=7) != bootstrap_mean_ci(x, n_resamples=300, seed=8)


def test_bootstrap_degenerate_inputs():
    assert bootstrap_mean_ci(np.full(50, 42.0)) == (42.0, 42.0)
    assert bootstrap_mean_ci(np.array([3.0])) == (3.0, 3.0)
    one = clean_metrics(PRED[:, :1], P_TRUE[:, :1], COS_TRUE[:, :1], LABELS[:1], n_resamples=100)
    assert one["acc_mean"].ci == (one["acc_mean"].value,) * 2
    with pytest.raises(ValueError):
        bootstrap_mean_ci(np.array([]))


def test_bootstrap_batched_resampling(monkeypatch):
    x = _coin(2_000)
    full = bootstrap_mean_ci(x, n_resamples=400)
    monkeypatch.setattr(metrics, "MAX_RESAMPLE_ELEMENTS", 20_000)  # batches of 10 resamples
    batched = bootstrap_mean_ci(x, n_resamples=400)
    assert batched[0] <= x.mean() <= batched[1]
    np.testing.assert_allclose(batched, full, atol=1.0)  # same interval up to resampling noise


def test_bootstrap_memory_is_bounded():
    x = _coin(20_000)
    tracemalloc.start()
    try:
        bootstrap_mean_ci(x, n_resamples=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6  # one unbatched [1000, 20000] resample matrix alone would be 160 MB


@pytest.mark.parametrize("n_images, max_elements", [(1_000, metrics.MAX_RESAMPLE_ELEMENTS), (1_000, 30_000)])
def test_shared_resample_equals_scipy_bootstrap_of_each_vector(monkeypatch, n_images, max_elements):
    """One count-matrix resample for a stack of vectors gives scipy's interval for each vector
    (same draws, batched alike; only the summation order differs)."""
    from scipy import stats

    monkeypatch.setattr(metrics, "MAX_RESAMPLE_ELEMENTS", max_elements)
    rng = np.random.default_rng(1)
    stacked = np.stack([_coin(n_images) * 100.0, rng.random(n_images) ** 3, rng.integers(0, 7, n_images) / 7.0,
                        np.full(n_images, 0.25)])
    got = metrics.bootstrap_intervals(stacked, n_resamples=300, seed=5)
    for row, ci in zip(stacked, got):
        if np.all(row == row[0]):
            assert ci == (row[0], row[0])
            continue
        ref = stats.bootstrap((row,), np.mean, n_resamples=300, batch=max(1, max_elements // n_images),
                              vectorized=True, method="percentile", rng=np.random.default_rng(5))
        np.testing.assert_allclose(ci, (ref.confidence_interval.low, ref.confidence_interval.high),
                                   rtol=0, atol=1e-9)


def test_metrics_of_a_run_share_one_resample():
    """with_intervals over two groups equals each group's own intervals under the same seed."""
    pert = PRED[None].repeat(2, axis=0).transpose(1, 0, 2)
    text_cos, unchanged = np.ones((*pert.shape[:2], 3)), np.zeros((*pert.shape[:2], 3), dtype=bool)
    clean = metrics.clean_points(PRED, P_TRUE, COS_TRUE, LABELS)
    perturbed = metrics.perturbation_points(PRED, pert, LABELS, text_cos, unchanged)
    together = metrics.with_intervals([clean, perturbed], n_resamples=200, seed=3)
    assert together[0] == clean_metrics(PRED, P_TRUE, COS_TRUE, LABELS, n_resamples=200, seed=3)
    assert together[1] == metrics.perturbation_metrics(PRED, pert, LABELS, text_cos, unchanged, n_resamples=200,
                                                       seed=3)
    assert together[0]["acc_mean"].ci is not None and together[1]["LPR"].ci is not None
