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
from .export import CSV_NAME, JSON_NAME, write_statistics
from .grid import SUMMARY, RunRecord, collect, load_groups, run_grid, summary_name, write_summary
from .markdown import write_markdown
from .stats import Comparison, Group, GroupSummary, compare_to_reference, summarise
from .sweep import Sweep
from .tables import attack_line, protocol_line, wording_line


@dataclass
class ComparisonResult:
    """What `run_comparison` produced.

    Attributes:
        summaries: One per (method, learner, dataset), aggregated over seeds, in report order.
        comparisons: Each method against the reference on the same images (may be empty).
        records: What happened to every run of the grid.
        left_out: ``method/learner`` pairs that do not fit.
        report: The markdown report, with ``statistics.json`` and ``.csv`` beside it (None for a shard).
        plots: The figures written (with ``plot``).
        summary_file: The runs' statuses (``summary.json``; a shard's own file).
    """

    summaries: list[GroupSummary]
    comparisons: list[Comparison]
    records: list[RunRecord]
    left_out: list[str]
    report: Path | None
    plots: list[Path]
    summary_file: Path


def run_comparison(sweep: Sweep, source: str = "flags", skip_existing: bool = False, overwrite: bool = False,
                   plot: bool = False, progress: ProgressFn | None = None,
                   on_record: Callable[[RunRecord], None] | None = None,
                   note: Callable[[str], None] | None = None, refuse_mismatched: bool = False,
                   shard: tuple[int, int] | None = None, jobs: int = 1,
                   report_only: bool = False, launcher: str | None = None,
                   tensorboard: bool = False) -> ComparisonResult:
    """Run every cell of `sweep`, then aggregate, test and write the report into ``sweep.output``.

    Args:
        source: Where the sweep came from (its TOML file, or ``flags``), for the report.
        plot: Also draw the figures (needs matplotlib: checked before any training).
        refuse_mismatched, shard, jobs, launcher: As `grid.run_grid`. A shard runs its cells and writes its
            own summary, but no report: the report needs every shard (`report_only` afterwards).
        tensorboard: Also write each finished run's training curves for TensorBoard
            (`tensorboard.write_curves`; checked before any run).
        report_only: Run nothing: aggregate the finished runs lying in ``sweep.output`` (from
            shards, job arrays, other machines), leaving out those recorded with other settings.

    Raises:
        UserError: no run finished, or (with `plot`) matplotlib is missing.
    """
    from .plots import all_plots, pyplot

    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if report_only and (shard or skip_existing or overwrite or launcher or jobs > 1):
        raise UserError("--report-only runs nothing: it takes no --shard, --jobs, --launcher, --skip-existing or "
                        "--overwrite")
    if launcher and (jobs > 1 or shard):
        raise UserError("--launcher submits every run as a job array: it takes no --jobs or --shard")
    if plot:
        pyplot()  # fail before an hour of training, not after
    if tensorboard:
        from .tensorboard import summary_writer, write_curves

        summary_writer()
    if report_only:
        records, left_out = collect(sweep)
    else:
        records, left_out = run_grid(sweep, skip_existing=skip_existing, overwrite=overwrite, progress=progress,
                                     on_record=on_record, note=note, refuse_mismatched=refuse_mismatched,
                                     shard=shard, jobs=jobs, launcher=launcher)
    if tensorboard:
        for r in records:
            if r.status in ("done", "existing"):
                write_curves(Path(r.folder), Path(sweep.output))
    if shard is not None:
        return ComparisonResult([], [], records, left_out, None, [], Path(sweep.output) / summary_name(shard))
    groups = load_groups(records)
    if not groups:
        raise UserError(f"no run finished; see {sweep.output}/{SUMMARY} for each run's error")
    order = {m: i for i, m in enumerate(sweep.methods)}
    groups.sort(key=lambda g: (g.dataset, order[g.method], g.learner))
    summaries = [summarise(g, sweep.bootstrap) for g in groups]
    comparisons = compare_to_reference(summaries, sweep.reference_name(), sweep.bootstrap)
    folder = Path(sweep.output)
    if report_only:
        write_summary(sweep, left_out, records)
    paths = all_plots(summaries, folder / "plots") if plot else []
    finished_runs = sum(r.status in ("done", "existing") for r in records)
    not_run = {status: sum(r.status == status for r in records) for status in ("failed", "missing", "mismatched")}
    setup = [f"sweep: {source}; reference: {sweep.reference_name()}",
             f"model {sweep.model}; datasets {', '.join(sweep.datasets)}; seeds {sweep.seeds}; {sweep.shots} shots; "
             f"{sweep.epochs} epochs; templates {sweep.templates}; perturbations {sweep.perturb}",
             wording_line(sweep),
             *([attack_line(records)] if sweep.attack is not None else []),
             protocol_line(sweep),
             f"runs: {finished_runs} finished, " + ", ".join(f"{n} {s}" for s, n in not_run.items() if n or s == "failed")
             + (f"; left out (method does not fit the learner): {', '.join(left_out)}" if left_out else ""),
             f"statistics as data: {JSON_NAME}, {CSV_NAME}"]
    write_statistics(folder, summaries, comparisons)
    report = write_markdown(folder / "report.md", "promptbench comparison", setup, summaries, comparisons, records,
                            paths, sweep)
    return ComparisonResult(summaries, comparisons, records, left_out, report, paths, folder / SUMMARY)


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
