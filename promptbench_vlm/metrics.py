"""Pure metric functions on per-template arrays, with bootstrap intervals over images.

Every headline metric (``acc_mean``, ``sensitivity``, ``acc_pert``, ``AS``, ``LPR`` the Logit
Preservation Rate, ``JSD`` its continuous companion) is the mean over images of a per-image
quantity. The per-image vectors are exposed
(`per_image_clean`, `per_image_perturbation`) so that an interval is the bootstrap of one
vector's mean and two learners evaluated on the same images can be compared pairwise
(`compare.inference.crossed_bootstrap` of the paired table). Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What each metric key of a result file stands for (docs/metrics.md has the definitions); the CSV
# export writes these beside the keys so a table read on its own still says what LPR is.
METRIC_NAMES: dict[str, str] = {
    "acc_mean": "accuracy, mean over templates (%)",
    "acc_std": "accuracy, std over templates",
    "acc_min": "accuracy, worst template (%)",
    "acc_max": "accuracy, best template (%)",
    "acc_spread": "accuracy spread, max - min (points)",
    "ensemble_acc": "prompt-ensemble accuracy (%)",
    "sensitivity": "sensitivity S(θ), Var_t of p(true)",
    "sensitivity_cos": "sensitivity on cosine",
    "flip_rate": "flip rate (share of images)",
    "acc_pert": "accuracy under the perturbation (%)",
    "AS": "accuracy shift (points)",
    "LPR": "Logit Preservation Rate (% of perturbed top-1 predictions equal to the clean one)",
    "JSD": "Jensen-Shannon divergence of perturbed and clean class distributions (nats)",
    "TS": "text shift (1 - cosine of clean and perturbed class text features)",
    "PDR": "performance drop rate",
    "unchanged_frac": "share of filled prompts the op could not change",
    "edits": "edits per filled prompt (units moved, for shuffle)",
    "base": "base-class accuracy (%)",
    "new": "new-class accuracy (%)",
    "H": "harmonic mean of base and new accuracy",
}

# Largest resample batch (resamples x images): 2.5e6 int64 draws plus their float64 count matrix,
# about 60 MB at any N and number of resamples (N = 50,000 x 1000 too).
MAX_RESAMPLE_ELEMENTS = 2_500_000


@dataclass(frozen=True)
class Estimate:
    """A metric's value and, when bootstrapping is on, its confidence interval.

    Attributes:
        value: The point estimate on all images.
        ci: ``(low, high)`` percentile bootstrap interval, or None when not computed.
    """

    value: float
    ci: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"value": v, "ci": [lo, hi] or None}``."""
        ci = None if self.ci is None else [float(self.ci[0]), float(self.ci[1])]
        return {"value": float(self.value), "ci": ci}


def _check_labels(pred: np.ndarray, labels: np.ndarray) -> None:
    """Fail early on shape mismatches that numpy broadcasting would silently accept."""
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if pred.shape[-1] != labels.shape[0] or pred.size == 0:
        raise ValueError(f"predictions of shape {pred.shape} do not match {labels.shape[0]} labels")


def _check_same_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


def _check_n_resamples(n_resamples: int) -> None:
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of predictions ``[N]`` against labels ``[N]``."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    _check_labels(pred, labels)
    _check_same_shape("pred", pred, labels.shape)
    return 100.0 * np.count_nonzero(pred == labels) / labels.shape[0]


def per_template_accuracy(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy in percent of each template: ``pred [T, N]`` -> ``[T]`` (or ``[T, R, N]`` -> ``[T, R]``)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    _check_labels(pred, labels)
    return 100.0 * np.count_nonzero(pred == labels, axis=-1) / labels.shape[0]


def per_image_clean(pred: np.ndarray, p_true: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image quantities whose means over images are the clean headline metrics.

    Args:
        pred: ``[T, N]`` predicted class per template.
        p_true: ``[T, N]`` softmax probability of the true class per template.
        labels: ``[N]`` true classes.

    Returns:
        ``{"acc_mean": 100 * mean_t correct, "sensitivity": Var_t p_true}``, each float64 ``[N]``.
    """
    pred, p_true, labels = np.asarray(pred), np.asarray(p_true), np.asarray(labels)
    _check_labels(pred, labels)
    if pred.ndim != 2:
        raise ValueError(f"pred has shape {pred.shape}, expected [T, N]")
    _check_same_shape("p_true", p_true, pred.shape)
    n_templates = pred.shape[0]
    return {
        "acc_mean": 100.0 * np.count_nonzero(pred == labels, axis=0) / n_templates,
        "sensitivity": np.var(p_true, axis=0).astype(np.float64),
    }


def per_image_perturbation(pred: np.ndarray, pred_pert: np.ndarray, labels: np.ndarray,
                           divergence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-image quantities whose means over images are the perturbation headline metrics.

    Args:
        pred: ``[T, N]`` clean predictions.
        pred_pert: ``[T, R, N]`` predictions with draw r of the perturbed template t.
        labels: ``[N]`` true classes.
        divergence: ``[T, R, N]`` JS divergence of the perturbed from the clean class
            distribution, if computed.

    Returns:
        ``acc_pert`` (100 * mean_{t,r} correct), ``AS`` (clean minus perturbed per-image
        accuracy, points), ``LPR`` (Logit Preservation Rate: 100 * mean_{t,r} 1[perturbed
        pred = clean pred]) and, with `divergence`, ``JSD`` (its mean over t, r), each float64 ``[N]``.
    """
    pred, pred_pert, labels = np.asarray(pred), np.asarray(pred_pert), np.asarray(labels)
    _check_labels(pred, labels)
    if pred.ndim != 2 or pred_pert.ndim != 3 or pred_pert.shape[::2] != pred.shape:
        raise ValueError(f"pred_pert has shape {pred_pert.shape}, expected [T, R, N] with pred [T, N] = {pred.shape}")
    n_templates, n_draws, _ = pred_pert.shape
    n_pert = n_templates * n_draws
    acc_clean = 100.0 * np.count_nonzero(pred == labels, axis=0) / n_templates
    acc_pert = 100.0 * np.count_nonzero(pred_pert == labels, axis=(0, 1)) / n_pert
    lpr = 100.0 * np.count_nonzero(pred_pert == pred[:, None, :], axis=(0, 1)) / n_pert
    out = {"acc_pert": acc_pert, "AS": acc_clean - acc_pert, "LPR": lpr}
    if divergence is not None:
        divergence = np.asarray(divergence)
        _check_same_shape("divergence", divergence, pred_pert.shape)
        out["JSD"] = np.mean(divergence, axis=(0, 1), dtype=np.float64)
    return out


def _check_resampling(per_image: np.ndarray, n_resamples: int) -> np.ndarray:
    """Per-image vectors stacked ``[M, N]`` as float64; raise on bad shapes or no resamples."""
    x = np.asarray(per_image, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"per-image values must be non-empty vectors [N] (stacked [M, N]), got shape {x.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1 for an interval, got {n_resamples}")
    return x


def resample_means(per_image: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap distributions ``[M, B]`` of the means of M per-image vectors ``[M, N]``, all
    under the same resampled images.

    The resample is drawn once for all M vectors and held as counts: row b of the count matrix
    says how often each image was drawn, so the M means of resample b are one matrix product
    ``X @ counts.T / N``. The draws are those of ``scipy.stats.bootstrap(...,
    rng=np.random.default_rng(seed))`` (``integers(0, N, (b, N))`` per batch of b resamples),
    so the distributions equal scipy's up to float summation order; batches of at most
    `MAX_RESAMPLE_ELEMENTS` draws keep memory bounded for any N.
    """
    x = _check_resampling(per_image, n_resamples)
    n = x.shape[1]
    rng = np.random.default_rng(seed)
    batch = max(1, MAX_RESAMPLE_ELEMENTS // n)
    means = np.empty((x.shape[0], n_resamples))
    for b0 in range(0, n_resamples, batch):
        b = min(batch, n_resamples - b0)
        drawn = rng.integers(0, n, (b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        means[:, b0 : b0 + b] = (x @ counts.T) / n
    return means


def _distributions(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """`resample_means` of the varying rows of ``[M, N]``; a constant row (N == 1 included) has
    the degenerate distribution of its constant, answered without resampling."""
    constant = np.all(x == x[:, :1], axis=1)
    out = np.repeat(x[:, :1], n_resamples, axis=1)
    if not constant.all():
        out[~constant] = resample_means(x[~constant], n_resamples, seed)
    return out


def _percentile_bounds(distributions: np.ndarray, confidence: float) -> list[tuple[float, float]]:
    """Percentile interval of each bootstrap distribution ``[M, B]`` (linear interpolation, as
    scipy's percentile method)."""
    alpha = (1 - confidence) / 2
    low, high = np.quantile(distributions, [alpha, 1 - alpha], axis=1)
    return [(float(lo), float(hi)) for lo, hi in zip(low, high)]


def bootstrap_intervals(
    per_image: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals of the means of M per-image vectors ``[M, N]``, all from
    one shared resample of the images: what every metric of an evaluation run uses.

    Returns:
        One ``(low, high)`` per row; ``(v, v)`` for a row whose every value is ``v``.
    """
    x = _check_resampling(per_image, n_resamples)
    return _percentile_bounds(_distributions(x, n_resamples, seed), confidence)


def bootstrap_mean_ci(
    per_image: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a per-image vector ``[N]``.

    Resampling images (not templates) is what makes the interval say how much the number
    would move on another draw of test images. Percentile rather than BCa because BCa's
    jackknife over N images is too slow at N = 50,000; resamples are batched so memory stays
    bounded. The same seed and N give the same resampled images for every metric.

    Returns:
        ``(low, high)``; ``(v, v)`` when every value is ``v`` (including N == 1).
    """
    x = np.asarray(per_image, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"per-image values must be a non-empty 1-D array, got shape {x.shape}")
    return bootstrap_intervals(x[None], n_resamples, seed, confidence)[0]


def with_intervals(
    groups: list[tuple[dict[str, Estimate], dict[str, np.ndarray]]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict[str, Estimate]]:
    """Attach bootstrap intervals to the per-image metrics of several metric groups at once.

    Each group is ``(point estimates, per-image vectors by metric name)`` as returned by
    `clean_points` and `perturbation_points`; the vectors of all groups are stacked and
    resampled once (`bootstrap_intervals`), so every interval of an evaluation run is computed
    under the same resampled images at the cost of one resample. ``n_resamples=0`` leaves the
    point estimates as they are.
    """
    _check_n_resamples(n_resamples)
    if n_resamples == 0:
        return [dict(points) for points, _ in groups]
    keys = [(g, name) for g, (_, vectors) in enumerate(groups) for name in vectors]
    if not keys:
        return [dict(points) for points, _ in groups]
    stacked = np.stack([groups[g][1][name] for g, name in keys])
    out = [dict(points) for points, _ in groups]
    for (g, name), ci in zip(keys, bootstrap_intervals(stacked, n_resamples, seed, confidence)):
        out[g][name] = Estimate(out[g][name].value, ci)
    return out


def clean_points(
    pred: np.ndarray, p_true: np.ndarray, cos_true: np.ndarray, labels: np.ndarray, pred_ens: np.ndarray | None = None
) -> tuple[dict[str, Estimate], dict[str, np.ndarray]]:
    """Point estimates of `clean_metrics` and the per-image vectors that get intervals."""
    pred, cos_true = np.asarray(pred), np.asarray(cos_true)
    per_image = per_image_clean(pred, p_true, labels)
    _check_same_shape("cos_true", cos_true, pred.shape)
    acc = per_template_accuracy(pred, labels)
    out = {
        "acc_mean": Estimate(float(np.mean(per_image["acc_mean"]))),
        "acc_std": Estimate(float(np.std(acc))),
        "acc_min": Estimate(float(acc.min())),
        "acc_max": Estimate(float(acc.max())),
        "acc_spread": Estimate(float(acc.max() - acc.min())),
        "sensitivity": Estimate(float(np.mean(per_image["sensitivity"]))),
        "sensitivity_cos": Estimate(float(np.mean(np.var(cos_true, axis=0)))),
        "flip_rate": Estimate(float(np.mean(np.any(pred != pred[0], axis=0)))),
    }
    if pred_ens is not None:
        out["ensemble_acc"] = Estimate(accuracy(pred_ens, labels))
    return out, per_image


def clean_metrics(
    pred: np.ndarray,
    p_true: np.ndarray,
    cos_true: np.ndarray,
    labels: np.ndarray,
    pred_ens: np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Estimate]:
    """Metrics of the unperturbed templates.

    Args:
        pred: ``[T, N]`` predicted class per template.
        p_true: ``[T, N]`` softmax probability of the true class.
        cos_true: ``[T, N]`` cosine of image and true-class text feature.
        labels: ``[N]`` true classes.
        pred_ens: ``[N]`` predictions of the template-ensemble classifier, if computed.
        n_resamples: Bootstrap resamples; 0 turns intervals off.
        seed: Bootstrap seed.
        confidence: Interval confidence level.

    Returns:
        ``acc_mean``, ``acc_std``, ``acc_min``, ``acc_max``, ``acc_spread``, ``sensitivity``,
        ``sensitivity_cos``, ``flip_rate`` and, with `pred_ens`, ``ensemble_acc``. Only
        ``acc_mean`` and ``sensitivity`` carry intervals: they are the headline numbers and
        means over images; min/max/std/spread are over templates.
    """
    _check_n_resamples(n_resamples)
    group = clean_points(pred, p_true, cos_true, labels, pred_ens)
    return with_intervals([group], n_resamples=n_resamples, seed=seed, confidence=confidence)[0]


def perturbation_points(
    pred: np.ndarray, pred_pert: np.ndarray, labels: np.ndarray, text_cos: np.ndarray, unchanged: np.ndarray,
    *, divergence: np.ndarray | None = None, edits: np.ndarray | None = None,
) -> tuple[dict[str, Estimate], dict[str, np.ndarray]]:
    """Point estimates of `perturbation_metrics` and the per-image vectors that get intervals."""
    pred_pert, text_cos, unchanged = np.asarray(pred_pert), np.asarray(text_cos), np.asarray(unchanged)
    per_image = per_image_perturbation(pred, pred_pert, labels, divergence)
    if text_cos.ndim != 3 or text_cos.shape[:2] != pred_pert.shape[:2]:
        raise ValueError(f"text_cos has shape {text_cos.shape}, expected [T, R, C] with [T, R] = {pred_pert.shape[:2]}")
    _check_same_shape("unchanged", unchanged, text_cos.shape)
    n_draws = pred_pert.shape[1]
    clean_sum = float(per_template_accuracy(pred, labels).sum())
    pert_sum = float(per_template_accuracy(pred_pert, labels).sum())
    out = {name: Estimate(float(np.mean(values))) for name, values in per_image.items()}
    out["TS"] = Estimate(1.0 - float(np.mean(text_cos, dtype=np.float64)))
    out["PDR"] = Estimate(1.0 - pert_sum / (n_draws * clean_sum) if clean_sum > 0 else 0.0)
    out["unchanged_frac"] = Estimate(float(np.mean(unchanged, dtype=np.float64)))
    if edits is not None:
        edits = np.asarray(edits)
        _check_same_shape("edits", edits, text_cos.shape)
        out["edits"] = Estimate(float(np.mean(edits, dtype=np.float64)))
    return out, per_image


def perturbation_metrics(
    pred: np.ndarray,
    pred_pert: np.ndarray,
    labels: np.ndarray,
    text_cos: np.ndarray,
    unchanged: np.ndarray,
    *,
    divergence: np.ndarray | None = None,
    edits: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Estimate]:
    """Metrics of one perturbation (op x level, R draws) against the clean templates.

    Args:
        pred: ``[T, N]`` clean predictions.
        pred_pert: ``[T, R, N]`` predictions with the perturbed templates.
        labels: ``[N]`` true classes.
        text_cos: ``[T, R, C]`` cosine of clean and perturbed class text features.
        unchanged: ``[T, R, C]`` True where the op could not change the filled prompt.
        divergence: ``[T, R, N]`` JS divergence of perturbed from clean class distributions.
        edits: ``[T, R, C]`` edits the op made to each filled prompt.
        n_resamples: Bootstrap resamples; 0 turns intervals off.
        seed: Bootstrap seed.
        confidence: Interval confidence level.

    Returns:
        ``acc_pert``, ``AS``, ``LPR`` and, with `divergence`, ``JSD`` (with intervals over
        images), ``TS`` (no interval: it is a mean over classes, not images), ``PDR``,
        ``unchanged_frac`` and, with `edits`, ``edits`` (mean edits per filled prompt). PDR is
        0.0 when every clean template has accuracy 0, since there is nothing left to drop.
    """
    _check_n_resamples(n_resamples)
    group = perturbation_points(pred, pred_pert, labels, text_cos, unchanged, divergence=divergence, edits=edits)
    return with_intervals([group], n_resamples=n_resamples, seed=seed, confidence=confidence)[0]


def harmonic_mean(base: float, new: float) -> float:
    """Base-to-new H = 2BN / (B + N): high only when both base and new accuracy are high.

    Returns 0.0 when both are 0 (the formula's limit), rather than dividing by zero.
    """
    if base < 0 or new < 0:
        raise ValueError(f"accuracies must be non-negative, got base={base}, new={new}")
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)
