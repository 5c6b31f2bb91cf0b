"""The comparison's statistics as data: ``statistics.json`` and ``statistics.csv`` beside ``report.md``.

The report's tables are rendered from the same `GroupSummary` and `Comparison` objects, so the
numbers here are the report's numbers at full precision: every cell (mean, std over seeds, 95 %
interval, seed count) of every group, subset, metric and perturbation, and every paired test
(difference, interval, resampled and seed-level test, raw and Holm-adjusted p, verdict).
The CSV holds one row per number, long form, for pandas or a spreadsheet.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..files import atomic_path
from ..results import write_json
from .stats import Cell, Comparison, GroupSummary

STATISTICS_SCHEMA = "promptbench_vlm/compare-statistics"
JSON_NAME, CSV_NAME = "statistics.json", "statistics.csv"
COLUMNS = ["kind", "method", "learner", "dataset", "seeds", "subset", "perturbation", "metric", "mean", "std",
           "ci_low", "ci_high", "n_seeds", "reference", "test", "p", "p_holm", "seed_diff", "seed_ci_low",
           "seed_ci_high", "seed_p", "survives_holm", "holm_family", "note"]


def _cell(cell: Cell) -> dict[str, Any]:
    return {"mean": cell.mean, "std": cell.std, "ci": list(cell.ci) if cell.ci is not None else None,
            "n_seeds": cell.n_seeds}


def _cells(cells: dict[str, Cell]) -> dict[str, Any]:
    return {metric: _cell(cell) for metric, cell in cells.items()}


def group_doc(summary: GroupSummary) -> dict[str, Any]:
    """One group's every reported cell, keyed as the report's tables are."""
    g = summary.group
    return {"method": g.method, "learner": g.learner, "dataset": g.dataset, "seeds": sorted(g.docs),
            "clean": {subset: _cells(cells) for subset, cells in summary.clean.items()},
            "base_new": _cells(summary.base_new),
            "base_new_by_wording": {pool: _cells(cells) for pool, cells in summary.base_new_by_wording.items()},
            "perturbations": {subset: {label: _cells(cells) for label, cells in labels.items()}
                              for subset, labels in summary.perturbations.items()},
            "worst_case": {subset: _cells(cells) for subset, cells in summary.worst_case.items()},
            "worst_case_curve": {subset: asdict(curve) for subset, curve in summary.worst_case_curve.items()}}


def comparison_doc(c: Comparison) -> dict[str, Any]:
    """One paired test, every field."""
    doc = asdict(c)
    doc["ci"] = list(c.ci) if c.ci is not None else None
    doc["seeds"] = list(c.seeds)
    doc["holm_family"] = c.family[3]
    if c.seed_test is not None:
        doc["seed_test"] = {"diff": c.seed_test.diff, "ci": list(c.seed_test.ci), "p_value": c.seed_test.p_value,
                            "per_seed": list(c.seed_test.per_seed)}
    return doc


def statistics_doc(summaries: list[GroupSummary], comparisons: list[Comparison]) -> dict[str, Any]:
    """The JSON document of ``statistics.json``."""
    return {"schema": STATISTICS_SCHEMA, "groups": [group_doc(s) for s in summaries],
            "comparisons": [comparison_doc(c) for c in comparisons]}


def _cell_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    lead = {"kind": "cell", "method": doc["method"], "learner": doc["learner"], "dataset": doc["dataset"],
            "seeds": " ".join(map(str, doc["seeds"]))}
    found = [(subset, "", cells) for subset, cells in doc["clean"].items()]
    found += [("base-new", "", doc["base_new"])]
    found += [(f"base-new/{pool}", "", cells) for pool, cells in doc["base_new_by_wording"].items()]
    found += [(subset, "", cells) for subset, cells in doc.get("worst_case", {}).items()]
    found += [(subset, label, cells) for subset, labels in doc["perturbations"].items()
              for label, cells in labels.items()]
    rows = []
    for subset, label, cells in found:
        for metric, cell in cells.items():
            ci = cell["ci"] or [None, None]
            rows.append({**lead, "subset": subset, "perturbation": label, "metric": metric, "mean": cell["mean"],
                         "std": cell["std"], "ci_low": ci[0], "ci_high": ci[1], "n_seeds": cell["n_seeds"]})
    return rows


def _comparison_row(c: dict[str, Any]) -> dict[str, Any]:
    ci = c["ci"] or [None, None]
    seed = c["seed_test"] or {"diff": None, "ci": [None, None], "p_value": None}
    label, _, metric = c["metric"].rpartition("/")
    return {"kind": "test", "method": c["group"], "dataset": c["dataset"], "seeds": " ".join(map(str, c["seeds"])),
            "subset": c["subset"], "perturbation": label, "metric": metric, "mean": c["diff"], "ci_low": ci[0],
            "ci_high": ci[1], "reference": c["reference"], "test": c["test"], "p": c["p_value"],
            "p_holm": c["p_holm"], "seed_diff": seed["diff"], "seed_ci_low": seed["ci"][0],
            "seed_ci_high": seed["ci"][1], "seed_p": seed["p_value"], "survives_holm": c["significant"],
            "holm_family": c.get("holm_family", ""), "note": c["note"]}


def statistics_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The long-form rows of ``statistics.csv``: a ``cell`` row per reported number, a ``test`` row
    per paired test (its difference in ``mean``)."""
    return [row for g in doc["groups"] for row in _cell_rows(g)] + [_comparison_row(c) for c in doc["comparisons"]]


def write_statistics(folder: str | Path, summaries: list[GroupSummary],
                     comparisons: list[Comparison]) -> tuple[Path, Path]:
    """Write ``statistics.json`` and ``statistics.csv`` into `folder`; return their paths."""
    folder = Path(folder)
    doc = statistics_doc(summaries, comparisons)
    json_path = write_json(doc, folder / JSON_NAME)
    csv_path = folder / CSV_NAME
    with atomic_path(csv_path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in statistics_rows(doc))
    return json_path, csv_path
