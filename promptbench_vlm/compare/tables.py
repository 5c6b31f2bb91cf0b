"""The comparison's tables as plain rows of strings, rendered with rich or as markdown.

Building the rows once and rendering them twice keeps the terminal and the report file showing
the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from ..protocols import TARGET_AVERAGE
from ..wordings import POOLS, split_subset_name, split_wordings, subset_name
from .grid import RunRecord
from .sweep import Sweep
from .stats import CLEAN_METRICS, PAIRED_WORST_CASE_METRICS, PERTURBATION_METRICS, WORST_CASE_METRICS, Cell, \
    Comparison, GroupSummary

DIGITS = {"acc_mean": 2, "sensitivity": 4, "AS": 2, "LPR": 2, "JSD": 4, "TS": 4, "base": 2, "new": 2, "H": 2,
          "worst_acc": 2, "starts_acc": 2, "worst_gap": 2}
NAMES = {"acc_mean": "acc", "sensitivity": "S(θ)", "AS": "AS", "LPR": "LPR", "JSD": "JSD", "TS": "TS",
         "worst_acc": "worst-case acc", "starts_acc": "acc (start templates)", "worst_gap": "gap"}


@dataclass
class TextTable:
    """A titled table of already formatted cells."""

    title: str
    header: list[str]
    rows: list[list[str]]


def fmt_cell(cell: Cell | None, digits: int) -> str:
    """``mean ± std [lo, hi]``; no ± with one seed, no interval when there is none."""
    if cell is None:
        return "-"
    text = f"{cell.mean:.{digits}f}"
    if cell.n_seeds > 1:
        text += f" ± {cell.std:.{digits}f}"
    if cell.ci is not None:
        text += f" [{cell.ci[0]:.{digits}f}, {cell.ci[1]:.{digits}f}]"
    return text


def _all_subsets(summaries: list[GroupSummary]) -> list[str]:
    return list(dict.fromkeys(s for summary in summaries for s in summary.subsets))


def _with_averages(summaries: list[GroupSummary], subsets: list[str]) -> list[str]:
    """`subsets` and, under a transfer protocol, the target averages (``target-average[@pool]``) after them."""
    return subsets + list(dict.fromkeys(k for s in summaries for k in s.clean if k.startswith(TARGET_AVERAGE)))


def wording_table(summaries: list[GroupSummary]) -> TextTable:
    """The wording protocol's table: per method and class subset, accuracy (and H) and S(θ) on the
    seen, held-out and out-of-family wordings side by side."""
    classes = list(dict.fromkeys(split_subset_name(s)[0] for s in _with_averages(summaries, _all_subsets(summaries))))
    rows = []
    for s in summaries:
        g = s.group
        lead = [g.method, g.learner, g.dataset, ",".join(map(str, sorted(g.docs)))]
        for subset in classes:
            for metric in CLEAN_METRICS:
                rows.append(lead + [subset, NAMES[metric]] + [
                    fmt_cell(s.clean.get(subset_name(subset, pool), {}).get(metric), DIGITS[metric]) for pool in POOLS])
        if s.base_new_by_wording:
            rows.append(lead + ["base-new", "H"] + [fmt_cell(s.base_new_by_wording.get(pool, {}).get("H"), 2)
                                                    for pool in POOLS])
    return TextTable("accuracy (%), H and S(θ) on seen / held-out / out-of-family wordings: mean ± std over seeds "
                     "[95% CI over seeds x images]",
                     ["method", "learner", "dataset", "seeds", "classes", "metric", *POOLS], rows)


def protocol_line(sweep: Sweep) -> str:
    """The report's line on the evaluation protocol (docs/compare.md, "Protocols")."""
    if not sweep.targets:
        return f"protocol: {sweep.protocol} (trained on the base classes; scored on base and new, H)"
    return (f"protocol: {sweep.protocol} (trained on all classes of the source; scored on its test split, subset "
            f"'all', and on each target with its own classes: {', '.join(sweep.targets)}; {TARGET_AVERAGE} = "
            "mean over the targets)")


def wording_line(sweep: Sweep) -> str:
    """The report's line on the wording protocol: the split's settings and pool sizes."""
    protocol = sweep.wording_protocol()
    if protocol is None:
        return f"wordings: all (every method trained as it says; evaluated on {sweep.templates} whole)"
    split = split_wordings(protocol)
    return (f"wordings: split of {protocol.pool} (seed {protocol.seed}, by family): {len(split.seen)} seen "
            f"(every method trains on these only), {len(split.held_out)} held out; {len(split.out_of_family)} "
            f"out-of-family ({protocol.out_of_family}); docs/wordings.md")


def attack_line(records: list[RunRecord]) -> str:
    """The report's line on the attacks: how many cells were attacked now, reused, or not."""
    counts: dict[str, int] = {}
    for r in records:
        if r.attack is not None:
            status = r.attack.partition(":")[0]
            counts[status] = counts.get(status, 0) + 1
    return ("attack (worst-case accuracy): " + ", ".join(f"{n} {status}" for status, n in counts.items())
            if counts else "attack (worst-case accuracy): no finished cell to attack")


def headline_table(summaries: list[GroupSummary]) -> TextTable:
    """One row per method/learner/dataset: base, new and H (or accuracy per subset) and S(θ); under
    the wording protocol, the seen / held-out / out-of-family table (`wording_table`)."""
    subsets = _all_subsets(summaries)
    if any(split_subset_name(s)[1] for s in subsets):
        return wording_table(summaries)
    with_h = any(s.base_new for s in summaries)
    subsets = _with_averages(summaries, subsets)
    acc_cols = ["base", "new", "H"] if with_h else subsets
    header = ["method", "learner", "dataset", "seeds"]
    header += [f"{c} (%)" if with_h else f"acc {c} (%)" for c in acc_cols] + [f"S(θ) {s}" for s in subsets]
    rows = []
    for s in summaries:
        g = s.group
        if with_h:
            accs = [fmt_cell(s.base_new.get(c), DIGITS[c]) for c in acc_cols]
        else:
            accs = [fmt_cell(s.clean.get(c, {}).get("acc_mean"), 2) for c in acc_cols]
        sens = [fmt_cell(s.clean.get(c, {}).get("sensitivity"), 4) for c in subsets]
        rows.append([g.method, g.learner, g.dataset, ",".join(map(str, sorted(g.docs)))] + accs + sens)
    return TextTable("accuracy (%) and sensitivity S(θ): mean ± std over seeds [95% CI over seeds x images]",
                     header, rows)


def worst_case_table(summaries: list[GroupSummary], sweep: Sweep | None = None) -> TextTable | None:
    """Per group and class subset: accuracy over the start templates, worst-case accuracy and their
    gap, all on the attacks' report images (None when no group has an attack)."""
    rows = []
    for s in summaries:
        g = s.group
        for subset, cells in s.worst_case.items():
            rows.append([g.method, g.learner, g.dataset, ",".join(map(str, sorted(g.docs))), subset]
                        + [fmt_cell(cells.get(m), DIGITS[m]) for m in WORST_CASE_METRICS])
    if not rows:
        return None
    settings = sweep.attack if sweep is not None else None
    how = (f"budget {settings.budget} wordings, beam {settings.beam}, at most {settings.max_edits} edits, "
           f"objective {settings.objective}, search on {settings.search_split}; ") if settings else ""
    return TextTable(f"worst-case accuracy (%) over meaning-preserving wordings ({how}report images the search "
                     "never saw; docs/attack.md): mean ± std over seeds [95% CI over seeds x report images]",
                     ["method", "learner", "dataset", "seeds", "classes", "acc, start templates", "worst-case acc",
                      "gap"], rows)


def budget_curve_table(summaries: list[GroupSummary]) -> TextTable | None:
    """Worst-case accuracy found after the start templates and after a quarter, half, three
    quarters and all of the budget, per group and class subset (None without attacks)."""
    curves = [(s, subset, c) for s in summaries for subset, c in s.worst_case_curve.items()]
    if not curves:
        return None
    first, last = min(c.wordings[0] for _, _, c in curves), max(c.wordings[-1] for _, _, c in curves)
    marks = list(dict.fromkeys([first, *(max(first, round(last * q)) for q in (0.25, 0.5, 0.75)), last]))
    rows = []
    for s, subset, curve in curves:
        at = np.maximum(np.searchsorted(curve.wordings, marks, side="right") - 1, 0)  # the last point at or before
        several = s.worst_case[subset]["worst_acc"].n_seeds > 1
        rows.append([s.group.label, s.group.dataset, subset]
                    + [f"{curve.mean[i]:.2f}" + (f" ± {curve.std[i]:.2f}" if several else "") for i in at])
    return TextTable("worst-case accuracy (%) found against the budget (wordings scored, start templates first): "
                     "mean ± std over seeds", ["method", "dataset", "classes", *(f"{m} wordings" for m in marks)], rows)


def perturbation_tables(summaries: list[GroupSummary]) -> list[TextTable]:
    """Per subset and metric (AS, LPR, JSD, TS): a row per group, a column per perturbation op:level;
    a metric no result file holds (JSD in files written before it existed) gets no table."""
    tables = []
    for subset in _all_subsets(summaries):
        labels = list(dict.fromkeys(lbl for s in summaries for lbl in s.perturbations.get(subset, {})))
        if not labels:
            continue
        for metric in PERTURBATION_METRICS:
            if not any(metric in cells for s in summaries for cells in s.perturbations.get(subset, {}).values()):
                continue
            rows = [[s.group.label, s.group.dataset]
                    + [fmt_cell(s.perturbations.get(subset, {}).get(lbl, {}).get(metric), DIGITS[metric])
                       for lbl in labels]
                    for s in summaries]
            tables.append(TextTable(f"{metric} per perturbation, subset {subset}", ["method", "dataset"] + labels,
                                    rows))
    return tables


def _metric_name(metric: str) -> tuple[str, int]:
    """Display name and digits of a comparison's metric key (``acc_mean``, ``OP:LEVEL/AS``)."""
    label, _, metric = metric.rpartition("/")
    return f"{label} {NAMES.get(metric, metric)}".strip(), DIGITS.get(metric, 2)


def paired_table(comparisons: list[Comparison], clean_only: bool = False) -> TextTable:
    """The paired tests: difference (group − reference) with its interval over seeds x images, the
    seed-level t-test beside it, the raw and Holm-adjusted p, and whether it survives Holm."""
    rows = []
    for c in comparisons:
        if clean_only and c.metric not in (*CLEAN_METRICS, *PAIRED_WORST_CASE_METRICS):
            continue
        name, digits = _metric_name(c.metric)
        if c.diff is None:
            rows.append([c.group, c.reference, c.dataset, c.subset, name, "-", "-", "-", "-", "-",
                         f"not tested: {c.note}"])
            continue
        seed = "-"
        if c.seed_test is not None:
            t = c.seed_test
            seed = f"{t.diff:+.{digits}f} [{t.ci[0]:+.{digits}f}, {t.ci[1]:+.{digits}f}] p={format_p(t.p_value)}"
        rows.append([c.group, c.reference, c.dataset, c.subset, name,
                     f"{c.diff:+.{digits}f} [{c.ci[0]:+.{digits}f}, {c.ci[1]:+.{digits}f}]", c.test,
                     format_p(c.p_value), format_p(c.p_holm) if c.p_holm is not None else "-", seed,
                     "yes" if c.significant else "no"])
    return TextTable("paired tests: method − reference [95% CI]; survives = Holm-adjusted p < 0.05 over the "
                     "method's family (headline: accuracy, S(θ), worst-case accuracy on every subset and wording pool; "
                     "perturbation: AS and LPR per op; each against the same reference)",
                     ["method", "reference", "dataset", "subset", "metric", "difference [95% CI]", "resampled",
                      "p", "p Holm", "seed t-test [95% CI]", "survives Holm"], rows)


def format_p(p: float) -> str:
    """A p-value to three decimals, ``<0.001`` below that (the p-values are continuous)."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def survivors(comparisons: list[Comparison]) -> list[str]:
    """One line per difference that survives Holm's correction, strongest first."""
    kept = sorted((c for c in comparisons if c.significant), key=lambda c: c.p_holm)
    lines = []
    for c in kept:
        name, digits = _metric_name(c.metric)
        lines.append(f"{c.group} vs {c.reference} ({c.dataset}, {c.subset}) {name}: {c.diff:+.{digits}f} "
                     f"[{c.ci[0]:+.{digits}f}, {c.ci[1]:+.{digits}f}], p Holm {format_p(c.p_holm)}")
    return lines


def runs_table(records: list[RunRecord]) -> TextTable:
    """The runs that did not finish, with their error: what the summary must not hide."""
    rows = [[r.method, r.learner, r.dataset, str(r.seed), r.status, r.error or ""]
            for r in records if r.status not in ("done", "existing")]
    rows += [[r.method, r.learner, r.dataset, str(r.seed), f"attack {r.attack.partition(':')[0]}",
              r.attack.partition(": ")[2]] for r in records if r.attack not in (None, "done", "existing")]
    return TextTable("runs that did not finish", ["method", "learner", "dataset", "seed", "status", "error"], rows)


def to_rich(table: TextTable) -> Table:
    """A rich table for the terminal."""
    out = Table(title=table.title, title_justify="left")
    for i, name in enumerate(table.header):
        out.add_column(name, justify="left" if i < 2 else "right")
    for row in table.rows:
        out.add_row(*row)
    return out


def to_markdown(table: TextTable) -> str:
    """A GitHub-flavoured markdown table with its title as a bold line above it."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = [f"**{table.title}**", "", line(table.header), line(["---"] * len(table.header))]
    parts += [line(row) for row in table.rows]
    return "\n".join(parts) + "\n"
