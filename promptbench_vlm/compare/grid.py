"""Run a sweep's grid: one folder per run, resumable, and a failed run never stops the others.

Trained methods go through `train.run.run_training` exactly as `promptbench train` does; the
``zeroshot`` entry evaluates the zero-shot learner on the same test images (base and new
classes). After every run the summary (``summary.json``) is rewritten, so an interrupted or
partly failed sweep keeps everything it finished.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..evaluate import ProgressFn
from ..results import read_result, write_json
from ..train.run import RESULT
from .stats import Group
from .sweep import ZEROSHOT, RunSpec, Sweep, plan

SUMMARY = "summary.json"
SUMMARY_SCHEMA = "promptbench_vlm/compare-summary"


@dataclass
class RunRecord:
    """What happened to one run: ``done``, ``existing`` (reused), ``failed`` or ``interrupted``."""

    method: str
    learner: str
    dataset: str
    seed: int
    folder: str
    status: str
    error: str | None = None
    wall_time_s: float = 0.0


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def run_folder(sweep: Sweep, spec: RunSpec) -> Path:
    """``OUTPUT/DATASET/METHOD__LEARNER__seedN``: one folder per run, named so reruns find it."""
    return Path(sweep.output) / _safe(spec.dataset) / f"{_safe(spec.method)}__{_safe(spec.learner)}__seed{spec.seed}"


def finished(folder: Path) -> bool:
    """A run is finished when its folder holds a complete, readable result file."""
    try:
        return bool(read_result(folder / RESULT).get("complete", True))
    except UserError:
        return False


def evaluate_zeroshot(sweep: Sweep, spec: RunSpec, folder: Path, progress: ProgressFn | None = None,
                      note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score the zero-shot learner on the test split's base and new classes, as a trained run is scored."""
    from ..data import DatasetOptions
    from ..evaluation import EvalRequest, literal, run_evaluation

    request = EvalRequest(model=sweep.model, pretrained=sweep.pretrained, learner=ZEROSHOT, dataset=spec.dataset,
                          dataset_options=DatasetOptions(split="test"), subset="base-new", templates=sweep.templates,
                          perturb=sweep.perturb, seed=spec.seed, bootstrap=sweep.bootstrap, device=sweep.device,
                          cache=False, output=literal(folder / RESULT), wordings=sweep.wording_protocol())
    return run_evaluation(request, progress=progress, note=note).doc


def train_run(sweep: Sweep, spec: RunSpec, folder: Path, progress: ProgressFn | None = None,
              note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one cell with `run_training`, with the method's own overrides."""
    from ..train.loop import TrainConfig
    from ..train.run import TrainRequest, run_training

    settings = sweep.settings(spec.method)
    config = TrainConfig(epochs=settings.epochs or sweep.epochs, batch_size=settings.batch_size or sweep.batch_size,
                         lr=settings.lr if settings.lr is not None else sweep.lr, seed=spec.seed)
    request = TrainRequest(method=sweep.registered(spec.method), learner=spec.learner, model=sweep.model, pretrained=sweep.pretrained,
                           dataset=spec.dataset, shots=sweep.shots, subset="base", output=str(folder),
                           method_options=dict(settings.options), learner_options=dict(settings.learner_options),
                           preset=settings.preset_record, config=config, eval_templates=sweep.templates,
                           wordings=sweep.wording_protocol(),
                           eval_perturb=sweep.perturb, bootstrap=sweep.bootstrap, device=sweep.device,
                           overwrite=True)
    return run_training(request, progress=progress, note=note)


def write_summary(sweep: Sweep, left_out: list[str], records: list[RunRecord]) -> Path:
    """Rewrite ``summary.json``: the sweep, the pairs left out, and each run's status so far."""
    doc = {"schema": SUMMARY_SCHEMA, "sweep": asdict(sweep), "left_out": left_out,
           "runs": [asdict(r) for r in records]}
    return write_json(doc, Path(sweep.output) / SUMMARY)


def run_grid(sweep: Sweep, skip_existing: bool = False, overwrite: bool = False,
             progress: ProgressFn | None = None, on_record: Callable[[RunRecord], None] | None = None,
             note: Callable[[str], None] | None = None) -> tuple[list[RunRecord], list[str]]:
    """Run every cell of the grid in order; return the records and the pairs left out.

    Args:
        sweep: The grid.
        skip_existing: Reuse runs whose folder holds a finished result (resume).
        overwrite: Rerun finished runs instead.
        progress: Progress callback handed to training and evaluation.
        on_record: Called after each run, for live reporting.
        note: Receives the runs' one-line messages for the user (warnings prefixed ``warning:``).

    Raises:
        UserError: finished runs exist and neither `skip_existing` nor `overwrite` says what to do.
        KeyboardInterrupt: after recording the interrupted run in the summary.
    """
    specs, left_out = plan(sweep)
    done_before = [s for s in specs if finished(run_folder(sweep, s))]
    if done_before and not (skip_existing or overwrite):
        raise UserError(f"{len(done_before)} run(s) already finished under {sweep.output} (e.g. "
                        f"{run_folder(sweep, done_before[0])}); pass --skip-existing to reuse them or --overwrite")
    records: list[RunRecord] = []
    for spec in specs:
        folder = run_folder(sweep, spec)
        record = RunRecord(spec.method, spec.learner, spec.dataset, spec.seed, str(folder), "done")
        started = time.perf_counter()
        if skip_existing and spec in done_before:
            record.status = "existing"
        else:
            try:
                run = evaluate_zeroshot if spec.method == ZEROSHOT else train_run
                run(sweep, spec, folder, progress, note)
            except KeyboardInterrupt:
                record.status, record.error = "interrupted", "interrupted by the user"
                records.append(record)
                write_summary(sweep, left_out, records)
                raise
            except Exception as err:  # one broken cell must not cost the rest of the grid
                record.status = "failed"
                record.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        record.wall_time_s = time.perf_counter() - started
        records.append(record)
        write_summary(sweep, left_out, records)
        if on_record:
            on_record(record)
    return records, left_out


def load_groups(records: list[RunRecord]) -> list[Group]:
    """Read the finished runs' result files into groups (one per method, learner and dataset)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for r in records:
        if r.status not in ("done", "existing"):
            continue
        key = (r.method, r.learner, r.dataset)
        group = groups.setdefault(key, Group(*key))
        group.docs[r.seed] = read_result(Path(r.folder) / RESULT)
    return list(groups.values())
