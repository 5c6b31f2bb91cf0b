"""Run a sweep's grid: one folder per run, resumable, and a failed run never stops the others.

Trained methods go through `train.run.run_training` exactly as `promptbench train` does; the
``zeroshot`` entry evaluates the zero-shot learner on the same test images (base and new
classes). After every run the summary (``summary.json``) is rewritten, so an interrupted or
partly failed sweep keeps everything it finished.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..evaluate import ProgressFn
from ..files import (FolderBusy, check_run_folder, claim_folder, mark_run_folder, reading_folder, release_folder,
                     remove_run_files)
from ..results import read_result, write_json
from ..train.run import RESULT, RUN_FILES
from .attacks import ATTACK_FILES, attack_cells, attack_status, our_attack_files, read_cell_attacks
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
    attack: str | None = None  # with the sweep's attack: done, existing, missing, mismatched/failed/not applicable: why


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
                          dataset_options=DatasetOptions(split="test"), subset=sweep.eval_subset,
                          targets=tuple(sweep.targets), templates=sweep.templates,
                          perturb=sweep.perturb, seed=spec.seed, bootstrap=sweep.bootstrap, device=sweep.device,
                          cache=False, output=literal(folder / RESULT), overwrite=True,  # the claimed cell's own file
                          wordings=sweep.wording_protocol())
    return run_evaluation(request, progress=progress, note=note).doc


def train_request(sweep: Sweep, spec: RunSpec, folder: Path):
    """The `TrainRequest` of one trained cell, with the method's own overrides; its options typed
    (`check_request`), so it compares equal to the ``train.json`` of the same cell."""
    from ..train.loop import TrainConfig
    from ..train.run import TrainRequest, check_request

    settings = sweep.settings(spec.method)
    config = TrainConfig(epochs=settings.epochs or sweep.epochs, batch_size=settings.batch_size or sweep.batch_size,
                         lr=settings.lr if settings.lr is not None else sweep.lr, seed=spec.seed)
    request = TrainRequest(method=sweep.registered(spec.method), learner=spec.learner, model=sweep.model, pretrained=sweep.pretrained,
                           dataset=spec.dataset, shots=sweep.shots, subset=sweep.train_subset, output=str(folder),
                           method_options=dict(settings.options), learner_options=dict(settings.learner_options),
                           preset=settings.preset_record, config=config, eval_templates=sweep.templates,
                           wordings=sweep.wording_protocol(),
                           eval_perturb=sweep.perturb, bootstrap=sweep.bootstrap, device=sweep.device,
                           overwrite=True, eval_targets=list(sweep.targets) or None)
    check_request(request)
    return request


def train_run(sweep: Sweep, spec: RunSpec, folder: Path, progress: ProgressFn | None = None,
              note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one cell with `run_training`."""
    from ..train.run import run_training

    return run_training(train_request(sweep, spec, folder), progress=progress, note=note)


def recorded_differences(sweep: Sweep, spec: RunSpec, folder: Path) -> list[str]:
    """The settings on which the finished run in `folder` differs from what the sweep asks of `spec`.

    A trained run is checked on its whole ``train.json`` request (method, options, epochs, shots,
    templates, perturbations, wordings, ...); a zero-shot run on its result's ``run`` block
    (model, data, split, subset, seed, bootstrap, perturbations). An unreadable record counts as
    a difference (``train.json``).
    """
    from ..perturb import parse_perturbations
    from ..train.run import SETTINGS, request_differences

    if spec.method != ZEROSHOT:
        try:
            recorded = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))["request"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return [SETTINGS]
        return request_differences(recorded, train_request(sweep, spec, folder))
    run = read_result(folder / RESULT)["run"]
    wanted = {"learner": ZEROSHOT, "model": sweep.model, "pretrained": sweep.pretrained, "dataset": spec.dataset,
              "split": "test", "subset": sweep.eval_subset, "seed": spec.seed, "bootstrap": sweep.bootstrap,
              "perturbations": [p.label for p in parse_perturbations(sweep.perturb)], "targets": list(sweep.targets)}
    run = {**run, "perturbations": [p["label"] for p in run.get("perturbations", [])],
           "targets": run.get("targets") or []}
    return [key for key, value in wanted.items() if run.get(key) != value]


def run_cell(sweep: Sweep, spec: RunSpec, progress: ProgressFn | None = None,
             note: Callable[[str], None] | None = None, wait: bool = True, reuse_finished: bool = False
             ) -> RunRecord:
    """Run one cell into its folder and record what happened; an error becomes a ``failed`` record.

    The cell's folder is claimed while it runs (`files.claim_folder`), so two processes never
    write one run folder at once. With `reuse_finished`, a result another process finished while
    this one waited is reused (``existing``), never rerun or removed.

    Raises:
        FolderBusy: another process holds the cell and `wait` is off.
        KeyboardInterrupt: as is, for the caller to record.
    """
    folder = run_folder(sweep, spec)
    record = RunRecord(spec.method, spec.learner, spec.dataset, spec.seed, str(folder), "done")
    started = time.perf_counter()
    try:
        check_run_folder(folder, (*RUN_FILES, *ATTACK_FILES.values()), replace=True, legacy=(RESULT,))
        claim_folder(folder, wait=wait)
        if reuse_finished and finished(folder):
            record.status = "existing"  # finished by another sweep on this folder
        else:
            remove_run_files(folder, our_attack_files(folder))  # the attacks of the run about to be replaced
            run = evaluate_zeroshot if spec.method == ZEROSHOT else train_run
            run(sweep, spec, folder, progress, note)
    except (KeyboardInterrupt, FolderBusy):
        raise
    except Exception as err:  # one broken cell must not cost the rest of the grid
        record.status = "failed"
        record.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    finally:
        release_folder(folder)
    record.wall_time_s = time.perf_counter() - started
    return record


def summary_name(shard: tuple[int, int] | None) -> str:
    """``summary.json``, or ``summary-shardIofN.json`` for one shard (shards never share a file)."""
    return SUMMARY if shard is None else f"summary-shard{shard[0]}of{shard[1]}.json"


def write_summary(sweep: Sweep, left_out: list[str], records: list[RunRecord],
                  shard: tuple[int, int] | None = None) -> Path:
    """Rewrite the summary: the sweep, the pairs left out, and each run's status so far."""
    doc = {"schema": SUMMARY_SCHEMA, "sweep": asdict(sweep), "left_out": left_out,
           "shard": list(shard) if shard else None, "runs": [asdict(r) for r in records]}
    return write_json(doc, Path(sweep.output) / summary_name(shard))


def reusable(sweep: Sweep, specs: list[RunSpec], refuse_mismatched: bool,
             note: Callable[[str], None] | None) -> set[RunSpec]:
    """The finished cells whose recorded settings equal the sweep's; the others are named (and rerun).

    Raises:
        UserError: with `refuse_mismatched`, the first finished run recorded with other settings.
    """
    keep: set[RunSpec] = set()
    for spec in specs:
        folder = run_folder(sweep, spec)
        if not finished(folder):
            continue
        differing = recorded_differences(sweep, spec, folder)
        if not differing:
            keep.add(spec)
        elif refuse_mismatched:
            raise UserError(f"{folder} was run with other settings than the sweep's ({', '.join(differing)} differ); "
                            "pass those settings, another --output, or --overwrite")
        elif note:
            note(f"warning: rerunning {spec.name}: its recorded settings differ from the sweep's "
                 f"({', '.join(differing)})")
    return keep


def check_transfer_targets(sweep: Sweep) -> None:
    """Load each target's test split once, before any run (and under domain generalisation each
    source's): a missing target folder or a domain-generalisation target with foreign classes
    fails now, not after the training."""
    from ..data import DatasetOptions, load_dataset
    from ..protocols import DOMAIN_GENERALIZATION, check_domain_targets

    if not sweep.targets:
        return
    options = DatasetOptions(split="test")
    targets = {spec: load_dataset(spec, options) for spec in sweep.targets}
    if sweep.protocol == DOMAIN_GENERALIZATION:
        for source in sweep.datasets:
            check_domain_targets(load_dataset(source, options), targets)


def run_grid(sweep: Sweep, skip_existing: bool = False, overwrite: bool = False,
             progress: ProgressFn | None = None, on_record: Callable[[RunRecord], None] | None = None,
             note: Callable[[str], None] | None = None, refuse_mismatched: bool = False,
             shard: tuple[int, int] | None = None, jobs: int = 1,
             launcher: str | None = None) -> tuple[list[RunRecord], list[str]]:
    """Run the cells of the grid (or of one shard); return the records, in plan order, and the pairs left out.

    Each cell's folder is claimed while it runs; in a serial run a cell another process (a second
    sweep on the same folder) is running is put off until the free ones are done, then waited for
    and reused.

    Args:
        sweep: The grid.
        skip_existing: Reuse runs whose folder holds a finished result recorded with the sweep's
            settings; a finished run recorded with other settings is rerun (and named).
        overwrite: Rerun finished runs instead.
        progress: Progress callback handed to training and evaluation (serial runs only).
        on_record: Called after each run, for live reporting.
        note: Receives the runs' one-line messages for the user (warnings prefixed ``warning:``).
        refuse_mismatched: With `skip_existing`, refuse (before any run) instead of rerunning a
            finished run recorded with other settings.
        shard: ``(I, N)``: run only the I-th of N disjoint parts of the grid (`launch.shard_cells`).
        jobs: Runs at once (`launch.run_pool`); 1 runs them in this process, one after another.
        launcher: ``local`` or ``slurm``: hand the runs to submitit instead (`launch.run_submitit`).

    Raises:
        UserError: finished runs exist and neither `skip_existing` nor `overwrite` says what to do.
        KeyboardInterrupt: after recording the interrupted run in the summary.
    """
    from .launch import run_pool, run_submitit, shard_cells

    specs, left_out = plan(sweep)
    if shard is not None:
        specs = shard_cells(specs, *shard)
    check_transfer_targets(sweep)
    check_run_folder(Path(sweep.output), (), replace=False, legacy=(SUMMARY,))
    mark_run_folder(Path(sweep.output))  # concurrent sweeps may share it: each cell is claimed in turn
    done_before = [s for s in specs if finished(run_folder(sweep, s))]
    if done_before and not (skip_existing or overwrite):
        raise UserError(f"{len(done_before)} run(s) already finished under {sweep.output} (e.g. "
                        f"{run_folder(sweep, done_before[0])}); pass --skip-existing to reuse them or --overwrite")
    reused = reusable(sweep, done_before, refuse_mismatched, note) if skip_existing else set()
    by_spec: dict[RunSpec, RunRecord] = {}

    def finish(spec: RunSpec, record: RunRecord) -> None:
        by_spec[spec] = record
        write_summary(sweep, left_out, [by_spec[s] for s in specs if s in by_spec], shard)
        if on_record:
            on_record(record)

    for spec in specs:
        if spec in reused:
            finish(spec, RunRecord(spec.method, spec.learner, spec.dataset, spec.seed,
                                   str(run_folder(sweep, spec)), "existing"))
    to_run = [s for s in specs if s not in reused]
    try:
        if launcher:
            run_submitit(sweep, to_run, launcher, finish)
        elif jobs > 1:
            run_pool(sweep, to_run, jobs, finish)
        else:  # a cell another sweep on this folder is running is put off, then waited for
            busy = []
            for spec in to_run:
                try:
                    finish(spec, run_cell(sweep, spec, progress, note, wait=False,
                                          reuse_finished=spec not in done_before))
                except FolderBusy:
                    busy.append(spec)
            for spec in busy:
                finish(spec, run_cell(sweep, spec, progress, note, reuse_finished=spec not in done_before))
    except KeyboardInterrupt:
        for spec in to_run:
            if spec not in by_spec:
                by_spec[spec] = RunRecord(spec.method, spec.learner, spec.dataset, spec.seed,
                                          str(run_folder(sweep, spec)), "interrupted", "interrupted by the user")
        write_summary(sweep, left_out, [by_spec[s] for s in specs], shard)
        raise
    records = [by_spec[s] for s in specs]
    if sweep.attack is not None:  # after the cells, in this process, reusing attacks that fit
        attack_cells(sweep, records, progress, note)
        write_summary(sweep, left_out, records, shard)
    return records, left_out


def collect(sweep: Sweep) -> tuple[list[RunRecord], list[str]]:
    """The grid's runs as they lie in ``sweep.output`` (written by any process, shard or job):
    ``existing`` when finished with the sweep's settings, ``mismatched`` (naming the keys) when
    finished with others, ``missing`` otherwise. Nothing runs."""
    specs, left_out = plan(sweep)
    records = []
    for spec in specs:
        folder = run_folder(sweep, spec)
        record = RunRecord(spec.method, spec.learner, spec.dataset, spec.seed, str(folder), "missing",
                           "no finished result file")
        if finished(folder):
            differing = recorded_differences(sweep, spec, folder)
            record.status, record.error = ("mismatched", f"settings differ: {', '.join(differing)}") if differing \
                else ("existing", None)
            if sweep.attack is not None and not differing:
                record.attack = attack_status(sweep, spec, folder)
        records.append(record)
    return records, left_out


def load_groups(records: list[RunRecord]) -> list[Group]:
    """Read the finished runs' result files into groups (one per method, learner and dataset)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for r in records:
        if r.status not in ("done", "existing"):
            continue
        key = (r.method, r.learner, r.dataset)
        group = groups.setdefault(key, Group(*key))
        with reading_folder(Path(r.folder)):  # never while another sweep rewrites it
            group.docs[r.seed] = read_result(Path(r.folder) / RESULT)
            if r.attack in ("done", "existing"):
                group.attacks[r.seed] = read_cell_attacks(Path(r.folder), group.docs[r.seed])
    return list(groups.values())
