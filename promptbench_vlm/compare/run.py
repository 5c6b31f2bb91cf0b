"""One comparison end to end: run the grid, aggregate over seeds, test against the reference, report.

`promptbench compare` parses its options into a `Sweep` and calls `run_comparison`; the Python
API does the same. `plot_result` is `promptbench report --plot`: one result file as figures and
a markdown report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..evaluate import ProgressFn
from .grid import SUMMARY, RunRecord, load_groups, run_grid
from .markdown import write_markdown
from .stats import Comparison, Group, GroupSummary, compare_to_reference, summarise
from .sweep import Sweep
from .tables import wording_line


@dataclass
class ComparisonResult:
    """What `run_comparison` produced.

    Attributes:
        summaries: One per (method, learner, dataset), aggregated over seeds, in report order.
        comparisons: Each method against the reference on the same images (may be empty).
        records: What happened to every run of the grid.
        left_out: ``method/learner`` pairs that do not fit.
        report: The markdown report; ``summary.json`` lies beside it.
        plots: The figures written (with ``plot``).
    """

    summaries: list[GroupSummary]
    comparisons: list[Comparison]
    records: list[RunRecord]
    left_out: list[str]
    report: Path
    plots: list[Path]

    @property
    def summary_file(self) -> Path:
        return self.report.parent / SUMMARY


def run_comparison(sweep: Sweep, source: str = "flags", skip_existing: bool = False, overwrite: bool = False,
                   plot: bool = False, progress: ProgressFn | None = None,
                   on_record: Callable[[RunRecord], None] | None = None,
                   note: Callable[[str], None] | None = None) -> ComparisonResult:
    """Run every cell of `sweep`, then aggregate, test and write the report into ``sweep.output``.

    Args:
        source: Where the sweep came from (its TOML file, or ``flags``), for the report.
        plot: Also draw the figures (needs matplotlib: checked before any training).

    Raises:
        UserError: no run finished, or (with `plot`) matplotlib is missing.
    """
    from .plots import all_plots, pyplot

    if plot:
        pyplot()  # fail before an hour of training, not after
    records, left_out = run_grid(sweep, skip_existing=skip_existing, overwrite=overwrite, progress=progress,
                                 on_record=on_record, note=note)
    groups = load_groups(records)
    if not groups:
        raise UserError(f"no run finished; see {sweep.output}/{SUMMARY} for each run's error")
    order = {m: i for i, m in enumerate(sweep.methods)}
    groups.sort(key=lambda g: (g.dataset, order[g.method], g.learner))
    summaries = [summarise(g, sweep.bootstrap) for g in groups]
    comparisons = compare_to_reference(summaries, sweep.reference_name(), sweep.bootstrap)
    folder = Path(sweep.output)
    paths = all_plots(summaries, folder / "plots") if plot else []
    setup = [f"sweep: {source}; reference: {sweep.reference_name()}",
             f"model {sweep.model}; datasets {', '.join(sweep.datasets)}; seeds {sweep.seeds}; {sweep.shots} shots; "
             f"{sweep.epochs} epochs; templates {sweep.templates}; perturbations {sweep.perturb}",
             wording_line(sweep),
             f"runs: {sum(r.status in ('done', 'existing') for r in records)} finished, "
             f"{sum(r.status == 'failed' for r in records)} failed"
             + (f"; left out (method does not fit the learner): {', '.join(left_out)}" if left_out else "")]
    report = write_markdown(folder / "report.md", "promptbench comparison", setup, summaries, comparisons, records,
                            paths)
    return ComparisonResult(summaries, comparisons, records, left_out, report, paths)


def plot_result(doc: dict[str, Any], file: Path) -> tuple[list[Path], Path]:
    """Figures and a markdown report of one result file, into ``FILE-plots/``.

    Returns:
        The figures and the markdown report written.
    """
    from .plots import all_plots

    run = doc["run"]
    group = Group((run.get("training") or {}).get("method", run["learner"]), run["learner"], run["dataset"],
                  {run.get("seed", 0): doc})
    summary = summarise(group, n_resamples=run.get("bootstrap", 1000), seed=run.get("seed", 0))
    folder = file.parent / f"{file.stem}-plots"
    paths = all_plots([summary], folder)
    md = write_markdown(folder / "report.md", f"{group.label} on {run['dataset']}", [f"result file: {file}"],
                        [summary], [], [], paths)
    return paths, md
