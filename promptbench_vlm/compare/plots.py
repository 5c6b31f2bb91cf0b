"""PNG figures of a comparison (or of one result file), with matplotlib as an optional extra.

Three views: accuracy per template for each method (Promise's figure-3 style: how far the
choice of template moves each method), sensitivity against accuracy, and the accuracy shift of
each perturbation with its interval; with attacks, a fourth: worst-case accuracy against budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .stats import GroupSummary

INSTALL_HINT = 'plotting needs matplotlib: pip install "promptbench_vlm[plot]"'


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a one-line error saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _err(cell: Any) -> list[list[float]] | None:
    """Error-bar lengths of a cell's interval; a percentile interval can miss the point estimate,
    so lengths are clipped at 0 rather than drawn negative."""
    if cell is None or cell.ci is None:
        return None
    return [[max(0.0, cell.mean - cell.ci[0])], [max(0.0, cell.ci[1] - cell.mean)]]


def _name(summary: GroupSummary, datasets: set[str]) -> str:
    return summary.group.label + (f" ({summary.group.dataset})" if len(datasets) > 1 else "")


def template_accuracy(summaries: list[GroupSummary], path: Path) -> Path:
    """Accuracy of every template per method, one panel per subset; templates ordered by the
    first method's accuracy so that the other methods' curves read as gains or losses."""
    plt = pyplot()
    subsets = list(dict.fromkeys(s for summary in summaries for s in summary.subsets))
    datasets = {s.group.dataset for s in summaries}
    fig, axes = plt.subplots(len(subsets), 1, figsize=(10, 3.2 * len(subsets)), squeeze=False)
    for ax, subset in zip(axes[:, 0], subsets):
        with_subset = [s for s in summaries if subset in s.per_template]
        order = np.argsort(with_subset[0].per_template[subset], kind="stable")
        for s in with_subset:
            acc = s.per_template[subset][order]
            ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", markersize=3, linewidth=1.2,
                    label=f"{_name(s, datasets)}: mean {acc.mean():.1f}, range {acc.min():.1f}-{acc.max():.1f}")
        ax.set_title(f"accuracy per template, subset {subset} (templates sorted by {with_subset[0].group.label})",
                     fontsize=9)
        ax.set_xlabel("template (rank)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def sensitivity_accuracy(summaries: list[GroupSummary], path: Path) -> Path:
    """Sensitivity S(θ) against mean accuracy per method and subset, with the 95 % intervals:
    a robust method sits low on S(θ) without giving up accuracy."""
    plt = pyplot()
    datasets = {s.group.dataset for s in summaries}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^v<>"
    subsets = list(dict.fromkeys(s for summary in summaries for s in summary.subsets))
    for i, s in enumerate(summaries):
        colour = f"C{i % 10}"
        for subset in s.subsets:
            acc, sens = s.clean[subset].get("acc_mean"), s.clean[subset].get("sensitivity")
            if acc is None or sens is None:
                continue
            ax.errorbar(sens.mean, acc.mean, xerr=_err(sens), yerr=_err(acc), color=colour,
                        marker=markers[subsets.index(subset) % len(markers)], capsize=3,
                        label=f"{_name(s, datasets)}, {subset}")
    ax.set_xlabel("sensitivity S(θ) (lower is better)")
    ax.set_ylabel("accuracy, mean over templates (%)")
    ax.set_title("sensitivity vs accuracy (95% CI over images)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_shift(summaries: list[GroupSummary], path: Path) -> Path:
    """Accuracy shift AS of each perturbation op:level per method (bars, 95 % intervals), one
    panel per subset: how many points each kind of rewording costs."""
    plt = pyplot()
    datasets = {s.group.dataset for s in summaries}
    subsets = [sub for sub in dict.fromkeys(x for s in summaries for x in s.subsets)
               if any(s.perturbations.get(sub) for s in summaries)]
    if not subsets:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no perturbations were evaluated", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    fig, axes = plt.subplots(len(subsets), 1, figsize=(10, 3.4 * len(subsets)), squeeze=False)
    width = 0.8 / len(summaries)
    for ax, subset in zip(axes[:, 0], subsets):
        labels = list(dict.fromkeys(lbl for s in summaries for lbl in s.perturbations.get(subset, {})))
        x = np.arange(len(labels))
        for i, s in enumerate(summaries):
            cells = [s.perturbations.get(subset, {}).get(lbl, {}).get("AS") for lbl in labels]
            heights = [c.mean if c else np.nan for c in cells]
            bars = [_err(c) or [[0.0], [0.0]] for c in cells]
            err = [[b[0][0] for b in bars], [b[1][0] for b in bars]]
            ax.bar(x + (i - (len(summaries) - 1) / 2) * width, heights, width, yerr=err, capsize=2,
                   label=_name(s, datasets))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.set_ylabel("accuracy shift AS (points)")
        ax.set_title(f"accuracy shift per perturbation, subset {subset} (higher = hurts more)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def budget_curve(summaries: list[GroupSummary], path: Path) -> Path:
    """Worst-case accuracy found against the number of wordings scored, per method (mean over
    seeds, shaded ± std), one panel per class subset: how fast the search finds a weak wording."""
    plt = pyplot()
    datasets = {s.group.dataset for s in summaries}
    subsets = list(dict.fromkeys(sub for s in summaries for sub in s.worst_case_curve))
    fig, axes = plt.subplots(len(subsets), 1, figsize=(8, 3.2 * len(subsets)), squeeze=False)
    for ax, subset in zip(axes[:, 0], subsets):
        for s in summaries:
            curve = s.worst_case_curve.get(subset)
            if curve is None:
                continue
            mean, std = np.asarray(curve.mean), np.asarray(curve.std)
            line, = ax.step(curve.wordings, mean, where="post", linewidth=1.2, label=_name(s, datasets))
            ax.fill_between(curve.wordings, mean - std, mean + std, step="post", alpha=0.15, color=line.get_color())
        ax.set_title(f"worst-case accuracy found vs budget, subset {subset} (report images)", fontsize=9)
        ax.set_xlabel("wordings scored (start templates first)")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def all_plots(summaries: list[GroupSummary], folder: Path) -> list[Path]:
    """Write the three figures (and, with attacks, the budget curve) into `folder`; return their paths."""
    folder = Path(folder)
    paths = [template_accuracy(summaries, folder / "accuracy_per_template.png"),
             sensitivity_accuracy(summaries, folder / "sensitivity_vs_accuracy.png"),
             accuracy_shift(summaries, folder / "accuracy_shift.png")]
    if any(s.worst_case_curve for s in summaries):
        paths.append(budget_curve(summaries, folder / "worst_case_vs_budget.png"))
    return paths
