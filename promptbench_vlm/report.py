"""Render a result document on the terminal with rich (used by `evaluate` and `report`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .metrics import METRIC_NAMES
from .wordings import subset_templates

CLEAN_ROWS = [(key, METRIC_NAMES[key]) for key in ("acc_mean", "acc_std", "acc_min", "acc_max", "acc_spread",
                                                   "ensemble_acc", "sensitivity", "sensitivity_cos", "flip_rate")]
# (metric key, column header, digits, show interval): intervals on the headline AS and LPR only
# and no acc' column (it is acc_mean - AS), so the table stays narrow; every metric and interval
# is in the JSON and the CSV. A file written before a metric existed shows "-" in its column.
PERTURBATION_COLUMNS = [("edits", "edits", 2, False), ("AS", "AS [95% CI]", 1, True),
                        ("LPR", "LPR [95% CI]", 1, True), ("JSD", "JSD", 4, False), ("TS", "TS", 3, False),
                        ("PDR", "PDR", 3, False), ("unchanged_frac", "unch.", 2, False)]
PERTURBATION_TITLE = ("perturbations: edits per prompt, AS accuracy shift (points), LPR Logit Preservation Rate "
                      "(% top-1 agreement with the clean prediction), JSD Jensen-Shannon divergence of the class "
                      "distributions (nats), TS text shift")


def fmt(estimate: dict[str, Any] | None, digits: int = 2, interval: bool = True) -> str:
    """Format ``{"value", "ci"}`` as ``v [lo, hi]``; values below 1 get at least 4 digits."""
    if estimate is None:
        return "-"
    value = estimate["value"]
    if digits == 2 and value is not None and abs(value) < 1 and value != 0:
        digits = max(digits, 4)
    text = f"{value:.{digits}f}"
    ci = estimate.get("ci")
    if ci and interval:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def result_console() -> Console:
    """A stdout console; when not a terminal (a log, a pipe), 120 columns rather than rich's 80."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def render(doc: dict[str, Any], console: Console | None = None, n_templates: int = 5) -> None:
    """Print the summary, clean metrics, perturbation metrics and best/worst templates."""
    console = console or result_console()
    run = doc["run"]
    title = f"{run['learner']} on {run['model']} - {run['dataset']} ({run['split']})"
    if not doc.get("complete", True):
        title += "  [INCOMPLETE: interrupted run]"
    for subset, body in doc["subsets"].items():
        skipped = f", {body['n_skipped']} corrupt images skipped" if body["n_skipped"] else ""
        clean = Table(title=f"{title} - subset {subset}: {body['n_images']} images, {body['n_classes']} classes, "
                      f"{len(body['per_template_acc'])} templates{skipped}", title_justify="left")
        clean.add_column("clean metric")
        clean.add_column("value [95% CI]", justify="right")
        for key, label in CLEAN_ROWS:
            if key in body["metrics"]:
                clean.add_row(label, fmt(body["metrics"][key]))
        console.print(clean)
        if body["perturbations"]:
            pert = Table(title=PERTURBATION_TITLE, title_justify="left")
            pert.add_column("op:level", no_wrap=True)
            for _, label, _, _ in PERTURBATION_COLUMNS:
                pert.add_column(label, justify="right", no_wrap=True)
            for p in body["perturbations"]:
                pert.add_row(p["label"], *(fmt(p["metrics"].get(key), digits, interval)
                                           for key, _, digits, interval in PERTURBATION_COLUMNS))
            console.print(pert)
        ranked = sorted(zip(body["per_template_acc"], subset_templates(doc, subset)))
        if len(ranked) > 1:
            tmpl = Table(title="worst and best templates", title_justify="left")
            tmpl.add_column("template")
            tmpl.add_column("acc (%)", justify="right")
            shown = ranked[:n_templates] + ranked[-n_templates:] if len(ranked) > 2 * n_templates else ranked
            for acc, template in shown:
                tmpl.add_row(template, f"{acc:.2f}")
            console.print(tmpl)
    if doc.get("base_new"):
        bn = doc["base_new"]
        console.print(f"base {bn['base']:.2f}  new {bn['new']:.2f}  H {bn['H']:.2f}")
    for pool, bn in doc.get("base_new_by_wording", {}).items():
        console.print(f"{pool + ' wordings:':<23} base {bn['base']:.2f}  new {bn['new']:.2f}  H {bn['H']:.2f}")
