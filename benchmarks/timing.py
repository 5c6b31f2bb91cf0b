"""What every benchmark script shares: thread count, interleaved repetitions, ratio summaries,
whole-command timings.

Ratios are medians over interleaved repetitions (A, B, A, B, ...), each repetition giving one
ratio, reported with the range of those ratios: other jobs on the machine slow both sides of a
pair alike, so the median of per-pair ratios is far steadier than a ratio of two single timings.
The thread count comes from ``OMP_NUM_THREADS`` (default 1): a fixed count of 2 made figures
depend on load (on a busy 2-core machine 2 threads were 4-50x slower than 1).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def threads_from_env() -> int:
    """``OMP_NUM_THREADS`` if set, else 1; applied to torch so the figure says what it ran with."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for child commands too
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class Timing:
    """Wall seconds and CPU seconds (user + system; of child processes for a command) of one run.

    On a loaded machine wall time stretches with the other jobs while CPU time stays close to the
    work done, so both are reported."""

    wall: float
    cpu: float


def measure(fn: Callable[[], object]) -> Timing:
    """Time `fn` in this process (its CPU time covers all of its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def seconds(fn: Callable[[], object]) -> float:
    return measure(fn).wall


def interleaved(fns: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """Run each fn once per repetition, in turn; each returns its own `Timing`."""
    out: dict[str, list[Timing]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


@dataclass(frozen=True)
class Ratio:
    """Median and range of per-repetition ratios a / b."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, a: Sequence[float], b: Sequence[float]) -> Ratio:
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        return cls(statistics.median(ratios), min(ratios), max(ratios))

    def __str__(self) -> str:
        return f"{self.median:.2f} (range {self.low:.2f}-{self.high:.2f})"


def median_s(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} s"


def walls(timings: Sequence[Timing]) -> list[float]:
    return [t.wall for t in timings]


def cpus(timings: Sequence[Timing]) -> list[float]:
    return [t.cpu for t in timings]


def ratios(a: Sequence[Timing], b: Sequence[Timing]) -> str:
    """``wall <ratio>, CPU <ratio>`` of two interleaved series."""
    return f"wall {Ratio.of(walls(a), walls(b))}, CPU {Ratio.of(cpus(a), cpus(b))}"


def timing_s(timings: Sequence[Timing]) -> str:
    """Median wall and CPU seconds of a series."""
    return f"{median_s(walls(timings))} (CPU {median_s(cpus(timings))})"


def run_command(args: Sequence[str], env: dict[str, str] | None = None) -> Timing:
    """Run a command to completion (output discarded); fail loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(args), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Timing(wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def machine_note() -> str:
    """Cores and the load average when the script ran: how loaded the figures' machine was."""
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
