"""Aggregate result files over seeds and test methods against a reference on the same images.

A group is one (method, learner, dataset) with one result per seed. Each number is reported as
the mean over seeds ± their standard deviation (ddof 0, as everywhere in this toolkit) and a
95 % interval that counts both sources of variation: the crossed seed x image bootstrap of the
per-seed, per-image values (`inference.crossed_bootstrap`; every seed sees the same test images).
A difference against the reference is tested the same way on the paired table (same seeds,
same images), with a seed-level paired t-test beside it; with a single seed the same bootstrap
over images alone is the test. Holm's correction runs over each family: one method against its
reference on one dataset and one kind of metric: the headline metrics (accuracy, S(θ) and
worst-case accuracy on every subset and wording pool) form one family, the perturbation metrics
(AS and LPR per op and level) another, so the verdicts a table's claims rest on are not diluted
by the 20 perturbation tests per subset.

Under the cross-dataset and domain-generalisation protocols each target dataset is a subset
(``target:LABEL``) with every statistic above, and ``target-average`` is the mean over the
targets of each target's mean: its interval and paired test are the stratified crossed bootstrap
(`inference.stratified_bootstrap`: seeds drawn once for all targets, images within each), with
the seed-level t-test on the per-seed averages beside it; it joins the method's headline Holm family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocols import TARGET_AVERAGE, is_target
from ..wordings import POOLS, split_subset_name, subset_name
from .inference import SeedTest, crossed_bootstrap, holm, seed_paired_test, stratified_bootstrap

CLEAN_METRICS = ("acc_mean", "sensitivity")
PERTURBATION_METRICS = ("AS", "LPR", "JSD", "TS")
# JSD is summarised with intervals but kept out of the paired family, so it does not change the
# Holm correction of the AS and LPR verdicts.
PAIRED_PERTURBATION_METRICS = ("AS", "LPR")
WORST_CASE_METRICS = ("starts_acc", "worst_acc", "worst_gap")
"""From a cell's attack (docs/attack.md), per report image, in %: the share of start templates that
classify it right, whether the worst wording found does, and their difference (the gap)."""
PAIRED_WORST_CASE_METRICS = ("worst_acc",)
HEADLINE_METRICS = CLEAN_METRICS + PAIRED_WORST_CASE_METRICS
"""The metrics of a method's headline Holm family; its AS and LPR tests form a second family."""
ALPHA = 0.05
"""Family-wise error rate of the Holm-corrected verdicts."""


@dataclass
class Cell:
    """One reported number: mean over seeds, std over seeds, and a 95 % interval (or None)."""

    mean: float
    std: float
    ci: tuple[float, float] | None
    n_seeds: int


@dataclass
class Group:
    """The runs of one (method, learner, dataset), one result document per seed."""

    method: str
    learner: str
    dataset: str
    docs: dict[int, dict[str, Any]] = field(default_factory=dict)
    attacks: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # seed -> class subset -> attack doc

    @property
    def label(self) -> str:
        return self.method if self.method == self.learner else f"{self.method}/{self.learner}"


@dataclass
class BudgetCurve:
    """Worst-case accuracy (%, report images) of the search's pick after each number of wordings
    scored, mean and std over the group's seeds (docs/attack.md, ``curve``)."""

    wordings: list[int]
    mean: list[float]
    std: list[float]


@dataclass
class GroupSummary:
    """Everything the tables and plots show for one group."""

    group: Group
    subsets: list[str]
    clean: dict[str, dict[str, Cell]]  # subset (and target-average[@pool]) -> metric -> cell
    base_new: dict[str, Cell]  # base, new, H (no interval on H: it is not a mean over images)
    perturbations: dict[str, dict[str, dict[str, Cell]]]  # subset -> op:level -> metric -> cell
    per_template: dict[str, np.ndarray]  # subset -> [T] accuracy, mean over seeds
    templates: list[str]
    per_image: dict[str, dict[str, np.ndarray]]  # subset -> metric key -> [S, N], rows in `seeds` order
    labels: dict[str, np.ndarray]  # subset -> [N], for the pairing check
    seeds: list[int] = field(default_factory=list)
    base_new_by_wording: dict[str, dict[str, Cell]] = field(default_factory=dict)  # pool -> base/new/H
    worst_case: dict[str, dict[str, Cell]] = field(default_factory=dict)  # class subset -> WORST_CASE_METRICS
    worst_case_images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # subset -> metric -> [S, N]
    worst_case_pairing: dict[str, str] = field(default_factory=dict)  # subset -> which report images (for pairing)
    worst_case_curve: dict[str, BudgetCurve] = field(default_factory=dict)  # subset -> worst-case acc vs budget


@dataclass
class Comparison:
    """A paired test of one group against the reference on one metric of one subset.

    Attributes:
        diff, ci, p_value: The difference (group − reference), its 95 % interval and p-value
            (`inference.crossed_bootstrap`: over seeds and images with several seeds, over images
            with one).
        test: Which of the two (``"seeds x images"`` or ``"images (1 seed)"``).
        seed_test: The paired t-test over seeds (None with one seed).
        p_holm: `p_value` after Holm's correction over the family (`family`).
        significant: Whether the difference survives that correction (``p_holm < ALPHA``).
        seeds: The seeds both sides share (the pairs used).
    """

    group: str
    reference: str
    dataset: str
    subset: str
    metric: str
    diff: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    significant: bool
    note: str = ""
    test: str = ""
    seed_test: SeedTest | None = None
    p_holm: float | None = None
    seeds: tuple[int, ...] = ()

    @property
    def family(self) -> tuple[str, str, str, str]:
        """(group, reference, dataset, kind): kind ``headline`` for accuracy, S(θ) and worst-case
        accuracy, ``perturbation`` for the per-op AS and LPR tests."""
        kind = "headline" if self.metric in HEADLINE_METRICS else "perturbation"
        return self.group, self.reference, self.dataset, kind


def per_image_values(doc: dict[str, Any], subset: str) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Labels and per-image metric vectors of one subset from the result file's counts.

    Keys are ``acc_mean``, ``sensitivity`` and ``OP:LEVEL/acc_pert|AS|LPR|JSD`` (JSD where the file
    has it); the values are the per-image quantities of docs/metrics.md. None for a file written
    before results carried them.
    """
    body = doc["subsets"][subset]
    counts = body.get("per_image")
    if not counts:
        return None
    n_templates = len(body["per_template_acc"])  # the subset's own wording pool
    clean_acc = 100.0 * np.asarray(counts["correct"], dtype=np.float64) / n_templates
    values = {"acc_mean": clean_acc, "sensitivity": np.asarray(counts["sensitivity"], dtype=np.float64)}
    draws = {p["label"]: p["draws"] for p in body["perturbations"]}
    for label, pert in counts["perturbations"].items():
        total = n_templates * draws[label]
        acc_pert = 100.0 * np.asarray(pert["correct"], dtype=np.float64) / total
        values[f"{label}/acc_pert"] = acc_pert
        values[f"{label}/AS"] = clean_acc - acc_pert
        values[f"{label}/LPR"] = 100.0 * np.asarray(pert["preserved"], dtype=np.float64) / total
        if "divergence" in pert:
            values[f"{label}/JSD"] = np.asarray(pert["divergence"], dtype=np.float64)
    return np.asarray(counts["labels"]), values


def _cell(per_seed: list[float], per_image: np.ndarray | None, fallback_ci: list | None, n_resamples: int,
          seed: int) -> Cell:
    """Mean ± std over seeds and an interval: with one seed the result file's own (so both agree),
    else the crossed seed x image bootstrap of the ``[S, N]`` per-image values when the files
    hold them."""
    ci: tuple[float, float] | None = None
    if fallback_ci and len(per_seed) == 1:
        ci = (float(fallback_ci[0]), float(fallback_ci[1]))
    elif per_image is not None and n_resamples > 0:
        ci = crossed_bootstrap(per_image, n_resamples, seed).ci
    return Cell(float(np.mean(per_seed)), float(np.std(per_seed)), ci, len(per_seed))


def summarise(group: Group, n_resamples: int = 1000, seed: int = 0) -> GroupSummary:
    """Aggregate a group's result documents over seeds (subsets every seed has)."""
    seeds = sorted(group.docs)
    docs = [group.docs[s] for s in seeds]
    subsets = [s for s in docs[0]["subsets"] if all(s in d["subsets"] for d in docs)]
    clean: dict[str, dict[str, Cell]] = {}
    perturbations: dict[str, dict[str, dict[str, Cell]]] = {}
    per_template: dict[str, np.ndarray] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for subset in subsets:
        bodies = [d["subsets"][subset] for d in docs]
        values = [per_image_values(d, subset) for d in docs]
        if all(v is not None for v in values) and all(np.array_equal(v[0], values[0][0]) for v in values):
            labels[subset] = values[0][0]
            per_image[subset] = {k: np.stack([v[1][k] for v in values]) for k in values[0][1]}
        images = per_image.get(subset, {})
        clean[subset] = {
            m: _cell([b["metrics"][m]["value"] for b in bodies], images.get(m), bodies[0]["metrics"][m].get("ci"),
                     n_resamples, seed)
            for m in CLEAN_METRICS if all(m in b["metrics"] for b in bodies)}
        perturbations[subset] = {}
        for k, pert in enumerate(bodies[0]["perturbations"]):
            label = pert["label"]
            same = [b["perturbations"][k] for b in bodies if k < len(b["perturbations"])]
            if len(same) != len(bodies) or any(p["label"] != label for p in same):
                continue
            perturbations[subset][label] = {
                m: _cell([p["metrics"][m]["value"] for p in same], images.get(f"{label}/{m}"),
                         pert["metrics"][m].get("ci"), n_resamples, seed)
                for m in PERTURBATION_METRICS if all(m in p["metrics"] for p in same)}
        per_template[subset] = np.mean([b["per_template_acc"] for b in bodies], axis=0)
    for average, members in target_groups(subsets).items():
        clean[average] = _average_cells(members, docs, per_image, n_resamples, seed)
    base_new = _base_new_cells([d.get("base_new") for d in docs], clean, "")
    pools = [p for p in POOLS if all(p in d.get("base_new_by_wording", {}) for d in docs)]
    by_wording = {p: _base_new_cells([d["base_new_by_wording"][p] for d in docs], clean, f"@{p}") for p in pools}
    summary = GroupSummary(group, subsets, clean, base_new, perturbations, per_template,
                           list(docs[0]["run"]["templates"]), per_image, labels, seeds, by_wording)
    _add_worst_case(summary, n_resamples, seed)
    return summary


def attack_values(doc: dict[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """Which report images an attack document was reported on (its split, data and labels, as one
    string), and its per-image `WORST_CASE_METRICS` in %."""
    per = doc["report_per_image"]
    worst = 100.0 * np.asarray(per["worst_correct"], dtype=np.float64)
    starts = 100.0 * np.asarray(per["starts_correct"], dtype=np.float64) / per["n_starts"]
    images = json.dumps({"splits": doc["splits"], "data": doc["run"]["dataset_fingerprint"], "labels": per["labels"]},
                        sort_keys=True)
    return images, {"worst_acc": worst, "starts_acc": starts, "worst_gap": starts - worst}


def _add_worst_case(summary: GroupSummary, n_resamples: int, seed: int) -> None:
    """Worst-case cells of the class subsets every seed of the group has an attack of, over seeds
    like every other cell; per-image tables only when every seed was reported on the same images."""
    attacks = [summary.group.attacks.get(s) for s in summary.seeds]
    if not all(attacks):
        return
    for subset in [s for s in attacks[0] if all(s in a for a in attacks)]:
        values = [attack_values(a[subset]) for a in attacks]
        same = all(v[0] == values[0][0] for v in values)
        images = {m: np.stack([v[1][m] for v in values]) for m in WORST_CASE_METRICS} if same else {}
        own = {"worst_acc": "worst_case_acc_ci", "starts_acc": "mean_acc_ci", "worst_gap": "gap_ci"}
        ci = {m: attacks[0][subset]["summary"][key] for m, key in own.items()}
        summary.worst_case[subset] = {
            m: _cell([float(v[1][m].mean()) for v in values], images.get(m),
                     None if ci[m] is None else [100.0 * c for c in ci[m]], n_resamples, seed)
            for m in WORST_CASE_METRICS}
        if same:
            summary.worst_case_images[subset], summary.worst_case_pairing[subset] = images, values[0][0]
        summary.worst_case_curve[subset] = budget_curve([a[subset]["curve"] for a in attacks])


def budget_curve(curves: list[list[dict[str, Any]]]) -> BudgetCurve:
    """The seeds' budget curves on one axis: at each number of wordings any seed recorded, each
    seed's worst report accuracy so far (its last point at or before it; a search that ran out of
    neighbours early keeps its last value), averaged."""
    counts = sorted({p["wordings"] for curve in curves for p in curve})
    table = np.empty((len(curves), len(counts)))
    for row, curve in enumerate(curves):
        points = sorted((p["wordings"], 100.0 * p["worst_report_acc"]) for p in curve)
        at = np.searchsorted([w for w, _ in points], counts, side="right") - 1
        table[row] = [points[max(i, 0)][1] for i in at]
    return BudgetCurve(counts, table.mean(0).tolist(), table.std(0).tolist())


def target_groups(subsets: list[str]) -> dict[str, list[str]]:
    """``target-average`` (``target-average@held-out`` per wording pool) -> the target subsets it averages."""
    groups: dict[str, list[str]] = {}
    for subset in subsets:
        if is_target(subset):
            groups.setdefault(subset_name(TARGET_AVERAGE, split_subset_name(subset)[1]), []).append(subset)
    return groups


def _average_cells(members: list[str], docs: list[dict[str, Any]], per_image: dict[str, dict[str, np.ndarray]],
                   n_resamples: int, seed: int) -> dict[str, Cell]:
    """The mean over targets of acc_mean and S(θ): per seed, then mean ± std over seeds, with the
    stratified crossed bootstrap interval when every target holds per-image values."""
    cells = {}
    for metric in CLEAN_METRICS:
        if not all(metric in d["subsets"][m]["metrics"] for d in docs for m in members):
            continue
        per_seed = [float(np.mean([d["subsets"][m]["metrics"][metric]["value"] for m in members])) for d in docs]
        tables = [per_image.get(m, {}).get(metric) for m in members]
        ci = None
        if n_resamples > 0 and all(t is not None for t in tables):
            ci = stratified_bootstrap(tables, n_resamples, seed).ci
        cells[metric] = Cell(float(np.mean(per_seed)), float(np.std(per_seed)), ci, len(per_seed))
    return cells


def _base_new_cells(per_doc: list[dict[str, float] | None], clean: dict[str, dict[str, Cell]], suffix: str
                    ) -> dict[str, Cell]:
    """base, new and H over seeds; base and new take their subset's acc_mean interval, H has none."""
    if not all(per_doc):
        return {}
    cells = {}
    for key in ("base", "new", "H"):
        subset = clean.get(key + suffix, {})
        ci = subset["acc_mean"].ci if "acc_mean" in subset else None
        per_seed = [d[key] for d in per_doc]
        cells[key] = Cell(float(np.mean(per_seed)), float(np.std(per_seed)), ci, len(per_seed))
    return cells


def find_reference(summaries: list[GroupSummary], reference: str, dataset: str, learner: str) -> GroupSummary | None:
    """The reference group for a group on `dataset` with `learner`.

    `reference` is ``METHOD`` or ``METHOD/LEARNER``; with a method only, the reference's run
    with the same learner is preferred (erm/coop against promise/coop), else its first one.
    """
    method, _, ref_learner = reference.partition("/")
    candidates = [s for s in summaries if s.group.dataset == dataset and s.group.method == method
                  and (not ref_learner or s.group.learner == ref_learner)]
    same = [s for s in candidates if s.group.learner == learner]
    return (same or candidates or [None])[0]


def compare_to_reference(summaries: list[GroupSummary], reference: str, n_resamples: int = 1000, seed: int = 0
                         ) -> list[Comparison]:
    """Paired tests of every group against the reference on acc_mean, S(θ), AS and LPR, and on
    worst-case accuracy (``worst_acc``) where both sides have attacks, Holm-corrected.

    A pair is tested on a subset only when both hold per-image values for the same images (equal
    label vectors) and share at least one seed; otherwise it is listed with a note saying why it
    was not tested. Only the seeds both sides ran are paired.
    """
    out: list[Comparison] = []
    for summary in summaries:
        g = summary.group
        ref = find_reference(summaries, reference, g.dataset, g.learner)
        if ref is None or ref is summary:
            continue
        shared = [s for s in summary.seeds if s in ref.seeds]
        for subset in summary.subsets:
            metrics = list(CLEAN_METRICS) + [f"{label}/{m}" for label in summary.perturbations.get(subset, {})
                                             for m in PAIRED_PERTURBATION_METRICS]
            a, b = summary.per_image.get(subset), ref.per_image.get(subset)
            same = a is not None and b is not None and np.array_equal(summary.labels[subset], ref.labels[subset])
            out += _subset_tests(summary, ref, subset, metrics, a, b, same, shared, n_resamples, seed)
        for subset in summary.worst_case:  # worst-case accuracy: the same tests on the attacks' report images
            a, b = summary.worst_case_images.get(subset), ref.worst_case_images.get(subset)
            same = a is not None and b is not None and \
                summary.worst_case_pairing[subset] == ref.worst_case_pairing.get(subset)
            out += _subset_tests(summary, ref, subset, PAIRED_WORST_CASE_METRICS, a, b, same, shared, n_resamples,
                                 seed, missing="no attack of every seed on one side")
        out += _paired_averages(summary, ref, shared, n_resamples, seed)
    return apply_holm(out)


def _subset_tests(summary: GroupSummary, ref: GroupSummary, subset: str, metrics: list[str] | tuple[str, ...],
                  a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None, same_images: bool,
                  shared: list[int], n_resamples: int, seed: int,
                  missing: str = "no per-image values in the result file(s)") -> list[Comparison]:
    """The paired tests of one subset's `metrics` (per-image tables `a` and `b`), or one untested
    comparison per metric with the reason (`missing` when a side has no tables)."""
    g = summary.group
    note = _untested(a is not None and b is not None, same_images, shared, n_resamples, missing)
    out = []
    for metric in metrics:
        if note or metric not in a or metric not in b:
            out.append(Comparison(g.label, ref.group.label, g.dataset, subset, metric, None, None, None, False,
                                  note or "metric missing on one side"))
            continue
        rows_a = a[metric][[summary.seeds.index(s) for s in shared]]
        rows_b = b[metric][[ref.seeds.index(s) for s in shared]]
        out.append(_paired(g.label, ref.group.label, g.dataset, subset, metric, rows_a, rows_b, shared,
                           n_resamples, seed))
    return out


def _paired_averages(summary: GroupSummary, ref: GroupSummary, shared: list[int], n_resamples: int, seed: int
                     ) -> list[Comparison]:
    """Paired tests of the target average (each pool's): stratified crossed bootstrap of the
    per-target differences, and the seed t-test of the per-seed average differences."""
    g, out = summary.group, []
    for average, members in target_groups(summary.subsets).items():
        a, b = [summary.per_image.get(m) for m in members], [ref.per_image.get(m) for m in members]
        present = all(x is not None for x in a + b)
        same = present and all(np.array_equal(summary.labels[m], ref.labels.get(m)) for m in members)
        note = _untested(present, same, shared, n_resamples)
        for metric in CLEAN_METRICS:
            if note or any(metric not in x for x in a + b):
                out.append(Comparison(g.label, ref.group.label, g.dataset, average, metric, None, None, None, False,
                                      note or "metric missing on one side"))
                continue
            rows_a = [x[metric][[summary.seeds.index(s) for s in shared]] for x in a]
            rows_b = [x[metric][[ref.seeds.index(s) for s in shared]] for x in b]
            boot = stratified_bootstrap([p - q for p, q in zip(rows_a, rows_b)], n_resamples, seed)
            mean_a = np.mean([r.mean(1) for r in rows_a], axis=0)[:, None]  # [S, 1]: each seed's average
            mean_b = np.mean([r.mean(1) for r in rows_b], axis=0)[:, None]
            test = "seeds x images, by target" if len(shared) > 1 else "images by target (1 seed)"
            out.append(Comparison(g.label, ref.group.label, g.dataset, average, metric, boot.value, boot.ci,
                                  boot.p_value, False, test=test, seed_test=seed_paired_test(mean_a, mean_b),
                                  seeds=tuple(shared)))
    return out


def _untested(present: bool, same_images: bool, shared: list[int], n_resamples: int,
              missing: str = "no per-image values in the result file(s)") -> str:
    """Why a pair cannot be tested (empty when it can): `missing` when a side has no per-image
    tables, else different images, no shared seed or no resamples."""
    if not present:
        return missing
    if not same_images:
        return "different test images"
    if not shared:
        return "no seed in common"
    return "bootstrap is off" if n_resamples < 1 else ""


def _paired(group: str, reference: str, dataset: str, subset: str, metric: str, a: np.ndarray, b: np.ndarray,
            seeds: list[int], n_resamples: int, seed: int) -> Comparison:
    """One paired test on ``[S, N]`` tables: crossed bootstrap and seed t-test, or the image test for one seed."""
    boot = crossed_bootstrap(a - b, n_resamples, seed)
    if len(seeds) == 1:
        return Comparison(group, reference, dataset, subset, metric, boot.value, boot.ci, boot.p_value, False,
                          test="images (1 seed)", seeds=tuple(seeds))
    return Comparison(group, reference, dataset, subset, metric, boot.value, boot.ci, boot.p_value, False,
                      test="seeds x images", seed_test=seed_paired_test(a, b), seeds=tuple(seeds))


def apply_holm(comparisons: list[Comparison], alpha: float = ALPHA) -> list[Comparison]:
    """Set `p_holm` and `significant` on the tested comparisons, one Holm family per
    `Comparison.family`; untested ones stay not significant."""
    families: dict[tuple[str, str, str, str], list[Comparison]] = {}
    for c in comparisons:
        if c.p_value is not None:
            families.setdefault(c.family, []).append(c)
    for members in families.values():
        for c, adjusted in zip(members, holm([c.p_value for c in members])):
            c.p_holm = adjusted
            c.significant = adjusted < alpha
    return comparisons
