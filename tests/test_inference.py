"""Intervals and tests that count training seeds (compare/inference.py) and Holm's correction."""

from __future__ import annotations

import numpy as np
import pytest

from promptbench_vlm.compare.inference import crossed_bootstrap, crossed_bootstrap_means, holm, seed_paired_test


def _seed_table(offsets: list[float], n_images: int = 200) -> np.ndarray:
    """Per-image values ``[S, N]``: shared image effects plus one offset per seed (known seed variance)."""
    images = np.random.default_rng(0).normal(0.0, 1.0, n_images)
    return np.stack([images + offset for offset in offsets])


def test_crossed_interval_is_wider_than_the_image_interval_when_seeds_disagree():
    offsets = [-1.0, -0.5, 0.0, 0.5, 1.0]  # seed sd 0.71: the seed-mean's sd (0.32) dwarfs the image-mean's (0.07)
    table = _seed_table(offsets)
    both = crossed_bootstrap(table, 2000, seed=3)
    images = crossed_bootstrap(table, 2000, seed=3, resample_seeds=False)
    assert both.seeds_resampled and not images.seeds_resampled
    assert both.value == pytest.approx(images.value)
    width_both, width_images = np.diff(both.ci)[0], np.diff(images.ci)[0]
    assert width_both > 3 * width_images
    # the seed factor alone: about 2 x 1.96 x sd(offsets) / sqrt(S) (ddof 0, as the bootstrap sees it)
    assert width_both == pytest.approx(2 * 1.96 * np.std(offsets) / np.sqrt(len(offsets)), rel=0.25)


def test_crossed_interval_equals_the_image_interval_when_seeds_agree():
    table = _seed_table([0.3, 0.3, 0.3])
    both = crossed_bootstrap(table, 1000, seed=5)
    images = crossed_bootstrap(table, 1000, seed=5, resample_seeds=False)
    one_seed = crossed_bootstrap(table[0], 1000, seed=5)
    assert both.ci == pytest.approx(images.ci, abs=1e-12) and both.ci == pytest.approx(one_seed.ci, abs=1e-12)
    assert both.p_value == images.p_value


def test_crossed_p_value_sees_a_difference_only_when_it_holds_across_seeds():
    noise = np.random.default_rng(1).normal(0.0, 0.2, (3, 300))
    flipping = noise + np.array([[1.0], [-0.9], [0.2]])  # large on every seed, opposite signs
    holds = crossed_bootstrap(noise + 0.5, 1000)
    flips = crossed_bootstrap(flipping, 1000)
    assert holds.p_value < 0.01 and holds.ci[0] > 0
    assert flips.p_value > 0.05 and flips.ci[0] < 0 < flips.ci[1]
    # what the image-only test of the seed-averaged values would have claimed
    assert crossed_bootstrap(flipping, 1000, resample_seeds=False).p_value < 0.05


def test_p_value_is_not_floored_by_the_resample_count_and_matches_the_tail_share_where_both_resolve():
    """A clear difference gets p far below 2 / (B + 1), so a large Holm family can still reject;
    where the resamples resolve the tail, p agrees with the share of resamples beyond 0."""
    rng = np.random.default_rng(2)
    clear = crossed_bootstrap(rng.normal(0.5, 1.0, (3, 400)), 1000)
    assert clear.p_value < 1e-6 < 2 / 1001 and holm([clear.p_value] + [0.5] * 131)[0] < 0.05
    borderline = rng.normal(0.05, 1.0, (1, 400))  # z about 1-2: thousands of resamples beyond 0
    test = crossed_bootstrap(borderline, 20000, seed=1)
    dist = crossed_bootstrap_means(borderline, 20000, seed=1)
    tail = 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))
    assert 0.01 < tail < 0.9 and test.p_value == pytest.approx(tail, abs=0.02)
    assert test.se == pytest.approx(dist.std(ddof=1))
    assert crossed_bootstrap(np.zeros((2, 5)), 100).p_value == 1.0  # no spread, no difference


def test_seed_paired_test_against_a_hand_computed_t_test():
    zeros = np.zeros((3, 4))
    a = zeros + np.array([[1.0], [2.0], [3.0]])  # per-seed differences 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3)
    test = seed_paired_test(a, zeros)
    assert test.diff == pytest.approx(2.0) and test.per_seed == (1.0, 2.0, 3.0)
    assert test.p_value == pytest.approx(0.07418, abs=1e-4)  # two-sided t(2) at 3.4641
    assert test.ci == pytest.approx((2 - 4.302653 / np.sqrt(3), 2 + 4.302653 / np.sqrt(3)), abs=1e-5)
    assert seed_paired_test(a[:1], zeros[:1]) is None  # one seed: no seed-level test
    assert seed_paired_test(zeros + 1, zeros).p_value == 0.0


def test_holm_adjusts_a_known_family():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4 0.02, x3 0.03, x2 0.06, x1 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    assert holm([0.04]) == [0.04] and holm([]) == []
    survivors = [p < 0.05 for p in holm([0.01, 0.04, 0.03, 0.005])]
    assert survivors == [True, False, False, True]  # 0.04 and 0.03 pass uncorrected, not after Holm
    with pytest.raises(ValueError):
        holm([0.2, 1.5])
