"""The markdown report: the settings, every table and the figures, in one file next to the runs."""

from __future__ import annotations

import os
from pathlib import Path

from .grid import RunRecord
from .stats import Comparison, GroupSummary
from .sweep import Sweep
from .tables import (budget_curve_table, headline_table, paired_table, perturbation_tables, runs_table, survivors,
                     to_markdown, worst_case_table)


def write_markdown(path: str | Path, title: str, setup: list[str], summaries: list[GroupSummary],
                   comparisons: list[Comparison], records: list[RunRecord], plots: list[Path],
                   sweep: Sweep | None = None) -> Path:
    """Write the report; figures are linked by paths relative to the report, so the folder can move.

    Args:
        path: The markdown file to write.
        title: The first heading.
        setup: Lines describing what was run (shown as a list).
        summaries: The aggregated groups.
        comparisons: The paired tests (may be empty).
        records: The grid's runs, for the failures section (may be empty).
        plots: PNG files to embed.
        sweep: The sweep (for its attack settings in the worst-case table's title).
    """
    path = Path(path)
    parts = [f"# {title}", "", *(f"- {line}" for line in setup), ""]
    failed = runs_table(records)
    if failed.rows:
        parts += ["## Runs that did not finish", "", to_markdown(failed)]
    parts += ["## Accuracy and sensitivity", "", to_markdown(headline_table(summaries))]
    if (worst := worst_case_table(summaries, sweep)) is not None:
        parts += ["## Worst-case accuracy", "", "The worst wording the attack found near the start templates, "
                  "picked on the search images and reported on the other images (docs/attack.md); its paired "
                  "test against the reference (metric worst-case acc) is among the paired tests below.", "",
                  to_markdown(worst)]
        if (curve := budget_curve_table(summaries)) is not None:
            parts += [to_markdown(curve)]
    if comparisons:
        tested = sum(c.p_value is not None for c in comparisons)
        kept = survivors(comparisons)
        parts += ["## Paired tests against the reference", "",
                  "With several seeds: the crossed bootstrap over training seeds and test images of the "
                  "paired per-image difference, with a paired t-test over seeds beside it; with one seed: "
                  "the bootstrap over test images; p from the normal approximation to the bootstrap "
                  "distribution (docs/metrics.md). Holm's correction over each method's two families of "
                  "tests against the same reference: the headline one (accuracy, S(θ) and worst-case "
                  "accuracy on every subset and wording pool) and the perturbation one (AS and LPR per op).", "",
                  f"**Differences that survive Holm's correction ({len(kept)} of {tested} tested):**", "",
                  *([f"- {line}" for line in kept] or ["- none"]), "",
                  to_markdown(paired_table(comparisons))]
    pert = perturbation_tables(summaries)
    if pert:
        parts += ["## Perturbations", "", "AS accuracy shift (points, positive = the perturbation hurts), "
                  "LPR Logit Preservation Rate (% of predictions equal to the clean one), JSD Jensen-Shannon "
                  "divergence of perturbed and clean class distributions (nats), "
                  "TS text shift (1 − cosine; no interval: it is a mean over classes).", ""]
        parts += [to_markdown(t) for t in pert]
    if plots:
        parts += ["## Figures", ""]
        parts += [f"![{p.stem.replace('_', ' ')}]({Path(os.path.relpath(p, path.parent)).as_posix()})\n" for p in plots]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
