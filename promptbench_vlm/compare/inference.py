"""Intervals and tests that count training seeds, and Holm's correction over a family of tests.

A trained method's number varies with two things: the training seed (few-shot draw,
initialisation, batch order) and the test images. The seeds and the images are *crossed*:
every seed is scored on the same test images. The interval of a mean over such a table
``[S seeds, N images]`` therefore resamples both factors at once, each with replacement, the
two-way ("pigeonhole") bootstrap of crossed designs (Owen 2007): one resample draws S seeds
and N images and averages the drawn cells. When every seed gives the same per-image values,
the seed draw changes nothing and the interval is the image-only bootstrap of the same
resampled images; when seeds disagree it is wider by their spread.

The seed-level paired test beside it treats each seed as one paired observation (the method's
mean minus the reference's on that seed's shared images) and runs a t-test over seeds: it asks
whether the difference would hold on another training seed, which is what a reader of "method
A beats method B" means. With one seed only the image-level test is possible.

Holm's step-down correction controls the family-wise error over a family of p-values (a
method against its reference on every subset, wording and metric): p_(i) is multiplied by
(m − i + 1) in ascending order, made monotone, and capped at 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

MAX_RESAMPLE_ELEMENTS = 2_500_000
"""Resamples x images handled per batch, so memory stays bounded for large test sets."""


@dataclass(frozen=True)
class BootstrapDifference:
    """A bootstrap estimate of a mean (or a mean difference) over seeds and images.

    Attributes:
        value: The mean over every seed and image.
        ci: Percentile interval.
        p_value: Two-sided p-value of ``value = 0`` from the normal approximation to the
            bootstrap distribution, ``2 Φ(−|value| / se)`` (`normal_p_value`). Not the share of
            resamples beyond 0: that share cannot go below 2 / (B + 1), so in a Holm family of m
            tests no difference could survive unless B > 2m / α (a 132-test family at B = 1000).
        se: Standard deviation of the bootstrap distribution (the standard error).
        n_seeds: Seeds in the table.
        seeds_resampled: Whether the seeds were resampled (False: image-only interval).
    """

    value: float
    ci: tuple[float, float]
    p_value: float
    n_seeds: int
    seeds_resampled: bool
    se: float = 0.0


@dataclass(frozen=True)
class SeedTest:
    """A paired t-test over seeds of the per-seed mean differences.

    Attributes:
        diff: Mean over seeds of the per-seed mean difference.
        ci: 95 % t interval of that mean (S − 1 degrees of freedom).
        p_value: Two-sided t-test p-value; 0 or 1 when every seed gives the same difference.
        per_seed: The per-seed mean differences, in seed order.
    """

    diff: float
    ci: tuple[float, float]
    p_value: float
    per_seed: tuple[float, ...]


def _table(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"values must be a non-empty [seeds, images] table, got shape {x.shape}")
    return x


def crossed_bootstrap_means(values: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                            resample_seeds: bool = True) -> np.ndarray:
    """Bootstrap distribution ``[n_resamples]`` of the mean of a ``[S, N]`` table.

    Image indices come from ``default_rng(seed)`` and seed indices from an independent stream,
    so the image draws are the same with and without seed resampling: the only difference
    between the two intervals is the seed factor.

    Args:
        values: Per-image values ``[S, N]`` (a ``[N]`` vector is one seed).
        n_resamples: Number of resamples (at least 1).
        seed: Seed of the resampling.
        resample_seeds: Draw seeds with replacement too; False averages the seeds first (the
            image-only interval of the seed-averaged values).
    """
    x = _table(values)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1 for an interval, got {n_resamples}")
    n_seeds, n_images = x.shape
    image_rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])
    out = np.empty(n_resamples)
    batch = max(1, MAX_RESAMPLE_ELEMENTS // n_images)
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        images = image_rng.integers(0, n_images, size=(size, n_images))
        if resample_seeds and n_seeds > 1:
            seed_weights = _seed_weights(seed_rng, size, n_seeds)
        else:
            seed_weights = np.full((size, n_seeds), 1.0 / n_seeds)
        rows = seed_weights @ x  # [size, N]: each resample's seed-weighted per-image values
        out[start:start + size] = np.take_along_axis(rows, images, axis=1).mean(1)
    return out


def _seed_weights(seed_rng: np.random.Generator, size: int, n_seeds: int) -> np.ndarray:
    """``[size, S]``: for each of `size` resamples, how often each seed was drawn (S draws with
    replacement), over S: the weights that average the drawn seeds' rows."""
    drawn = seed_rng.integers(0, n_seeds, size=(size, n_seeds))
    return np.stack([np.bincount(d, minlength=n_seeds) for d in drawn]) / n_seeds


def crossed_bootstrap(values: np.ndarray, n_resamples: int = 1000, seed: int = 0, resample_seeds: bool = True,
                      confidence: float = 0.95) -> BootstrapDifference:
    """Mean of a ``[S, N]`` table with its crossed seed x image bootstrap interval and p-value.

    For a method difference pass the paired table ``a − b`` (same seeds, same images).
    """
    x = _table(values)
    dist = crossed_bootstrap_means(x, n_resamples, seed, resample_seeds)
    return _estimate(float(x.mean()), dist, n_resamples, confidence, x.shape[0], resample_seeds)


def stratified_bootstrap(tables: list[np.ndarray], n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> BootstrapDifference:
    """The mean over strata of each ``[S, N_k]`` table's mean (the average over target datasets),
    with its crossed seed x image bootstrap: one resample draws the S seeds once for every
    stratum (each seed is one trained model, scored on every target) and N_k images within each
    stratum, so a large target weighs no more than a small one, as in the average it estimates.

    For a method difference pass the paired tables ``a − b`` of each stratum.
    """
    xs = [_table(t) for t in tables]
    n_seeds = xs[0].shape[0]
    if any(x.shape[0] != n_seeds for x in xs):
        raise ValueError(f"every stratum needs the same seeds, got {[x.shape[0] for x in xs]}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1 for an interval, got {n_resamples}")
    image_rng, seed_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    dist = np.zeros(n_resamples)
    batch = max(1, MAX_RESAMPLE_ELEMENTS // max(x.shape[1] for x in xs))
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        seed_weights = _seed_weights(seed_rng, size, n_seeds)
        for x in xs:
            images = image_rng.integers(0, x.shape[1], size=(size, x.shape[1]))
            dist[start:start + size] += np.take_along_axis(seed_weights @ x, images, axis=1).mean(1) / len(xs)
    return _estimate(float(np.mean([x.mean() for x in xs])), dist, n_resamples, confidence, n_seeds)


def _estimate(value: float, dist: np.ndarray, n_resamples: int, confidence: float, n_seeds: int,
              seeds_resampled: bool = True) -> BootstrapDifference:
    """Percentile interval, bootstrap standard error and its normal two-sided p-value (`normal_p_value`)."""
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(dist, [alpha, 1 - alpha])
    se = float(dist.std(ddof=1)) if n_resamples > 1 else 0.0
    return BootstrapDifference(value, (float(lo), float(hi)), normal_p_value(value, se), n_seeds,
                               seeds_resampled and n_seeds > 1, se)


def normal_p_value(value: float, se: float) -> float:
    """Two-sided p of ``value = 0`` for an estimate with standard error `se`: ``2 Φ(−|value| / se)``.

    A zero spread gives 1 for a zero value and 0 otherwise (every resample agrees). The
    bootstrap supplies `se`; the normal shape is the usual large-sample approximation of a mean
    over images, and it keeps p continuous, so Holm's correction can act on a large family.
    """
    if se == 0.0 or not np.isfinite(se):
        return 1.0 if value == 0 else 0.0
    return float(min(1.0, 2.0 * stats.norm.sf(abs(value) / se)))


def seed_paired_test(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> SeedTest | None:
    """Paired t-test over seeds of ``mean_images(a − b)``; None with fewer than two seeds.

    Args:
        a, b: Per-image values ``[S, N]`` of two methods, rows in the same seed order.
    """
    a, b = _table(a), _table(b)
    if a.shape != b.shape:
        raise ValueError(f"paired tables must have the same shape, got {a.shape} and {b.shape}")
    per_seed = (a - b).mean(1)
    n = per_seed.shape[0]
    if n < 2:
        return None
    mean, sd = float(per_seed.mean()), float(per_seed.std(ddof=1))
    if sd == 0.0:  # every seed agrees exactly: no spread to test against
        return SeedTest(mean, (mean, mean), 1.0 if mean == 0 else 0.0, tuple(per_seed.tolist()))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
    p_value = float(stats.ttest_1samp(per_seed, 0.0).pvalue)
    return SeedTest(mean, (mean - half, mean + half), p_value, tuple(per_seed.tolist()))


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order.

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m − j + 1) p_(j)); a hypothesis is
    rejected at level α when its adjusted p is below α, which controls the family-wise error
    rate at α for any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError(f"p-values must lie in [0, 1], got {p_values}")
    order = np.argsort(p, kind="stable")
    m = p.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()
