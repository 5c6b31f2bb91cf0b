"""Where a sweep's runs execute: a shard of the grid, and several runs at once on one machine.

A shard takes every N-th cell of the planned order (round-robin), so N tasks of a job array,
each given ``--shard I/N``, run every cell exactly once without talking to each other; the plan's
order depends only on the sweep, so every task computes the same split. `run_pool` runs cells in
K worker processes (spawned: no CUDA state or threads are inherited), each pinned to one GPU
through ``CUDA_VISIBLE_DEVICES`` when GPUs are present, else given its share of the CPU threads.
`run_submitit` hands the cells to submitit (one job array per sweep, resources from the
sweep's ``[resources]`` table, logs per run under ``OUTPUT/launcher-logs/``): SLURM on a cluster,
its local executor on one machine and in the tests. Every cell writes only its own folder; the
parent alone writes the summary.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..errors import UserError
from .grid import RunRecord, run_cell, run_folder
from .sweep import RunSpec, Sweep

LAUNCHERS = ("local", "slurm")
"""submitit executors `--launcher` accepts."""


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (1 <= I <= N) as ``(I, N)``.

    Raises:
        UserError: anything else.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UserError(f"--shard must be I/N with 1 <= I <= N (e.g. 1/4), got '{text}'")
    return int(match[1]), int(match[2])


def shard_cells(specs: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """The cells of shard `index` of `count` (1-based): every `count`-th cell of the plan from the
    `index`-th. Shards are disjoint, together the whole plan, and differ in size by at most one."""
    return specs[index - 1::count]


def worker_settings(slot: int, jobs: int) -> dict[str, str]:
    """Environment of worker `slot` of `jobs`: its GPU (round-robin over the visible ones) when CUDA
    is present, else its share of the CPU threads (at least one)."""
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": devices[slot % len(devices)]}
    threads = max(1, torch.get_num_threads() // jobs)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _start_worker(slots) -> None:  # runs in the worker before it imports torch
    os.environ.update(slots.get())


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_one(sweep: Sweep, spec: RunSpec):
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    return run_cell(sweep, spec, note=_note)


def run_pool(sweep: Sweep, specs: list[RunSpec], jobs: int, finish: Callable) -> None:
    """Run `specs` in `jobs` worker processes; call ``finish(spec, record)`` in this process as each ends.

    Raises:
        KeyboardInterrupt: after cancelling the runs not started (running ones are stopped with
            the pool).
    """
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(worker_settings(slot, jobs))
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(slots,))
    try:
        futures = {pool.submit(_run_one, sweep, spec): spec for spec in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                record = future.result()
            except Exception as err:  # the worker died (killed, out of memory): that cell failed
                record = _died(sweep, spec, err)
            finish(spec, record)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _died(sweep: Sweep, spec: RunSpec, err: Exception) -> RunRecord:
    return RunRecord(spec.method, spec.learner, spec.dataset, spec.seed, str(run_folder(sweep, spec)),
                     "failed", f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")


def run_submitit(sweep: Sweep, specs: list[RunSpec], launcher: str, finish: Callable) -> None:
    """Submit `specs` as one submitit job array and call ``finish(spec, record)`` as each result
    comes back (in submission order).

    Args:
        launcher: ``slurm`` (a cluster's sbatch) or ``local`` (submitit's local executor: subprocesses).

    Raises:
        UserError: an unknown launcher, submitit not installed, or a ``[resources]`` key submitit refuses.
    """
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{launcher}'; choose one of {', '.join(LAUNCHERS)}")
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher needs submitit: pip install 'promptbench_vlm[cluster]'") from None
    try:
        executor = submitit.AutoExecutor(folder=Path(sweep.output) / "launcher-logs" / "%j", cluster=launcher)
    except RuntimeError as err:  # no sbatch/srun here
        raise UserError(f"--launcher {launcher}: {str(err).strip().splitlines()[0]}") from None
    try:
        executor.update_parameters(name="promptbench-compare", **sweep.resources)
    except (ValueError, TypeError, NameError) as err:
        raise UserError(f"sweep [resources]: {str(err).strip().splitlines()[0]}") from None
    if not specs:
        return
    jobs = executor.map_array(_run_one, [sweep] * len(specs), specs)
    for spec, job in zip(specs, jobs):
        try:
            record = job.result()
        except Exception as err:  # the job died or was cancelled: that cell failed
            record = _died(sweep, spec, err)
        finish(spec, record)
