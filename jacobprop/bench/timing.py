"""Measuring: interleaved repeats, medians, peak memory, the machine and its matmul peak.

The method (stated in every report header):

1. Warm-up: each path of a group runs once under `tracemalloc` (its result
   is kept for the correctness column, its peak traced allocation is the
   memory column), then once more untraced to calibrate how many calls make
   one timed sample (at least `MIN_SAMPLE_SECONDS` = 20 ms of work: timer
   resolution and loop overhead vanish, and on a shared machine every sample
   spans several scheduler time slices, so a preemption is spread over many
   samples instead of making a few of them bimodal outliers).
2. Repeats are interleaved: round r times every path of the group once, in an
   order rotated by r, so slow drift (thermal, other tenants, frequency
   scaling) hits every path alike. A path slower than the group's time
   budget allows is timed in fewer rounds (at least `MIN_REPEATS`) spread
   evenly over all rounds.
3. Per path: the median over its samples and the interquartile range.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Case",
    "Timing",
    "measure_group",
    "machine_info",
    "matmul_peak",
    "MIN_SAMPLE_SECONDS",
    "MIN_REPEATS",
]

MIN_SAMPLE_SECONDS = 2e-2
MIN_REPEATS = 3
MEMORY_METHOD = "tracemalloc peak during one call (Python objects and NumPy buffers)"


@dataclass
class Case:
    """One path of a benchmark group: a zero-argument callable and how to judge it.

    Attributes
    ----------
    path : str
        Row label ("vjp", "numpy-reference", "torch", ...).
    fn : callable or None
        The work to time; its return value is handed to `check`.
    check : callable or None
        `check(result) -> (deviation, against)` or `(deviation, against, extra)`:
        the correctness column (and facts for the row's `extra`).
    skip : str or None
        Why the path is not run (memory cap, missing peer, ...).
    flops : float or None
        Flops of one call, for GFLOP/s.
    traced : bool
        Whether tracemalloc sees the path's allocations (False for torch/jax).
    peer : str or None
        The optional library this path runs on, if any.
    """

    path: str
    fn: Callable[[], Any] | None = None
    check: Callable[[Any], tuple] | None = None
    skip: str | None = None
    flops: float | None = None
    traced: bool = True
    peer: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Timing:
    """What was measured for one case."""

    samples: list[float]
    number: int
    peak_bytes: int | None
    result: Any

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def quartiles(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q1), float(q3)


def _traced_call(fn, traced: bool):
    """Run `fn` once; return `(result, seconds, peak traced bytes or None)`."""
    if not traced:
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start, None
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    if not already:
        tracemalloc.stop()
    return result, seconds, max(int(peak), 0)


def _time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _rounds_for(taken: int, total: int) -> set[int]:
    """`taken` round indices spread evenly over `range(total)`."""
    if taken >= total:
        return set(range(total))
    return {round(i * (total - 1) / (taken - 1)) for i in range(taken)} if taken > 1 else {0}


def measure_group(
    cases: list[Case],
    repeats: int,
    *,
    budget_seconds: float = 2.0,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time the runnable cases of one group with interleaved repeats.

    Parameters
    ----------
    cases : list of Case
        Skipped cases (`skip` set) are left out.
    repeats : int
        Rounds; each path is timed once per round it takes part in.
    budget_seconds : float
        Rough timing budget per path; slower paths take part in fewer rounds
        (never fewer than `MIN_REPEATS`).
    on_sample : callable, optional
        Called after every timed sample (progress bar).

    Returns
    -------
    dict path -> Timing, or path -> str (the error) for a path that raised
    """
    runnable = []
    warm = {}
    failures = {}
    for case in cases:
        if case.skip is not None:
            continue
        try:
            result, seconds, peak = _traced_call(case.fn, case.traced)
        except Exception as error:  # a crashing path becomes a result row
            failures[case.path] = f"{type(error).__name__}: {error}"
            continue
        runnable.append(case)
        if seconds < 10 * MIN_SAMPLE_SECONDS:  # traced calls run slower: re-time fast ones
            seconds = _time(case.fn, 1)
        number = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(seconds, 1e-9)))
        taken = min(repeats, max(MIN_REPEATS, int(budget_seconds / max(seconds * number, 1e-9))))
        warm[case.path] = (result, peak, number, _rounds_for(taken, repeats))
    samples: dict[str, list[float]] = {case.path: [] for case in runnable}
    for r in range(repeats):
        shift = r % max(len(runnable), 1)
        for case in runnable[shift:] + runnable[:shift]:
            _, _, number, rounds = warm[case.path]
            if r in rounds:
                samples[case.path].append(_time(case.fn, number))
                if on_sample is not None:
                    on_sample()
    timings: dict[str, Timing | str] = {
        case.path: Timing(samples[case.path], warm[case.path][2], warm[case.path][1],
                          warm[case.path][0])
        for case in runnable
    }
    timings.update(failures)
    return timings


# ---- the machine ------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _blas_info() -> list[dict]:
    """BLAS/OpenMP libraries and their thread counts, by threadpoolctl if present."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        return [
            {
                "library": str(info.get("internal_api", info.get("prefix", "?"))),
                "version": str(info.get("version")),
                "architecture": str(info.get("architecture")),
                "threads": int(info.get("num_threads", 0)),
                "source": "threadpoolctl",
            }
            for info in threadpool_info()
        ]
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return [
            {
                "library": str(blas.get("name")),
                "version": str(blas.get("version")),
                "architecture": "?",
                "threads": 0,
                "source": "numpy.show_config (thread count unknown without threadpoolctl)",
            }
        ]
    except (TypeError, KeyError, AttributeError):  # numpy < 1.25 has no dict mode
        return []


def machine_info() -> dict:
    """CPU, cores, versions, BLAS and threading: the header of every report."""
    import scipy

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    env_keys = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    from .. import __version__

    return {
        "cpu": _cpu_model(),
        "cores": int(cores),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "jacobprop": __version__,
        "blas": _blas_info(),
        "env": {key: os.environ[key] for key in env_keys if key in os.environ},
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none).

    Recorded at the start of a run: a load near or above the core count means
    other processes competed for the CPUs and multi-threaded BLAS timings
    suffer most.
    """
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def matmul_peak(dtype: str, size: int = 1024, tries: int = 5) -> float:
    """Best-of-`tries` GFLOP/s of one `(size, size) @ (size, size)` product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    a @ b
    best = min(_time(lambda: a @ b, 1) for _ in range(tries))
    return 2.0 * size**3 / best / 1e9
