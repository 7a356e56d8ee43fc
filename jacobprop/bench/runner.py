"""Run a list of benchmark groups and collect one versioned result document.

`run_bench` is the pure core behind the CLI: it takes fully parsed options,
measures, and returns the document (the same dict `--json` writes). Printing
goes to the streams it is given.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .jacobians import curvature_group, jacobian_group, ntk_group, per_sample_group
from .models import MLPSpec
from .peers import PEERS, PeerMissing, import_peer, peer_versions, set_peer_threads
from .schema import SCHEMA_VERSION
from .suites import evaluate_targets
from .timing import MEMORY_METHOD, MIN_SAMPLE_SECONDS, machine_info, matmul_peak, measure_group
from .workloads import Limits, grad_group, gradcheck_group

#: The workloads of `bench/jacobians.py` (Jacobians beyond the gradient), all with peers.
DERIVATIVE_WORKLOADS = {
    "jacobian": jacobian_group,
    "ntk": ntk_group,
    "per-sample": per_sample_group,
    "curvature": curvature_group,
}

__all__ = ["BenchPlan", "run_bench"]


@dataclass
class BenchPlan:
    """Everything one `jacobprop bench` run does, already validated.

    Attributes
    ----------
    groups : list of (workload, MLPSpec, extra peers)
    repeats : int
    budget_seconds : float
        Rough timing budget per path and group (slow paths get fewer rounds).
    peers : tuple of str
        `--against`, applied to every grad and gradcheck group.
    limits : Limits
    suite : str or None
    command : str
        The command line, recorded in the document.
    seed : int
    peer_threads : int or None
        torch's intra-op threads (`--peer-threads`); None keeps torch's default.
    """

    groups: list
    repeats: int = 9
    budget_seconds: float = 1.0
    peers: tuple = ()
    limits: Limits = field(default_factory=Limits)
    suite: str | None = None
    command: str = "jacobprop bench"
    seed: int = 0
    peer_threads: int | None = None


def _builders(workload, spec: MLPSpec, peers, plan: BenchPlan):
    if workload == "grad":
        return grad_group(spec, seed=plan.seed, peers=peers, limits=plan.limits)
    if workload in DERIVATIVE_WORKLOADS:
        return DERIVATIVE_WORKLOADS[workload](spec, seed=plan.seed, peers=peers)
    return gradcheck_group(spec, seed=plan.seed, peers=peers)


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def available_peers(names, stderr) -> tuple[list[str], list[str]]:
    """Split `names` into importable peers and the one-line messages for missing ones."""
    present, missing = [], []
    for name in names:
        try:
            import_peer(name)
        except PeerMissing as error:
            missing.append(str(error))
            print(str(error), file=stderr)
        else:
            present.append(name)
    return present, missing


def run_bench(plan: BenchPlan, *, stderr=None, progress: bool = False) -> dict:
    """Measure every group of `plan`; return the result document (see `schema.SCHEMA`).

    Parameters
    ----------
    plan : BenchPlan
    stderr : text stream
        Where the missing-peer lines and the progress bar go.
    progress : bool
        Show a tqdm bar (if tqdm is installed).
    """
    stderr = sys.stderr if stderr is None else stderr
    started = time.perf_counter()
    machine = machine_info()  # first, so the load average is the one before our own work
    wanted = list(dict.fromkeys(list(plan.peers) + [p for g in plan.groups for p in g[2]]))
    present, missing = available_peers([p for p in wanted if p in PEERS], stderr)
    set_peer_threads(present, plan.peer_threads)
    dtypes = sorted({spec.dtype for _, spec, _ in plan.groups}, reverse=True)
    peaks = {dtype: matmul_peak(dtype) for dtype in dtypes}
    bar = _progress_bar(len(plan.groups), stderr) if progress else None
    groups, rows = [], []
    for index, (workload, spec, extra_peers) in enumerate(plan.groups):
        if bar is not None:
            bar.set_description(f"{workload} {spec.label()}")
        peers = [p for p in dict.fromkeys(list(plan.peers) + list(extra_peers)) if p in present]
        group = _builders(workload, spec, peers, plan)
        timings = measure_group(group.cases, plan.repeats, budget_seconds=plan.budget_seconds)
        groups.append({
            "index": index,
            "workload": workload,
            "label": spec.label(),
            "config": spec.as_dict(),
            "baseline": group.baseline,
            "deviation_against": group.against,
            "matmul_bound": group.matmul_bound,
            "notes": list(group.notes),
            "extra": dict(group.extra),
        })
        rows.extend(_rows(index, group, timings, peaks))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "jacobprop bench",
        "command": plan.command,
        "suite": plan.suite,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "matmul_peak_gflops": peaks,
        "method": {
            "repeats": plan.repeats,
            "interleaved": True,
            "statistic": "median",
            "spread": "interquartile range",
            "memory": MEMORY_METHOD,
            "min_sample_seconds": MIN_SAMPLE_SECONDS,
            "budget_seconds": plan.budget_seconds,
        },
        "peers": peer_versions(present),
        "missing_peers": missing,
        "groups": groups,
        "rows": rows,
        "targets": evaluate_targets(groups, rows),
        "elapsed_s": time.perf_counter() - started,
    }


def _rows(index, group, timings, peaks) -> list[dict]:
    rows = []
    baseline = timings.get(group.baseline)
    base_median = baseline.median if baseline is not None and not isinstance(baseline, str) \
        else None
    for case in group.cases:
        row = {
            "group": index,
            "workload": group.workload,
            "path": case.path,
            "peer": case.peer,
            "status": "skipped",
            "reason": case.skip,
            "median_s": None,
            "iqr_s": None,
            "q1_s": None,
            "q3_s": None,
            "samples": [],
            "calls_per_sample": None,
            "ratio": None,
            "flops": case.flops,
            "gflops": None,
            "peak_fraction": None,
            "peak_memory_bytes": None,
            "deviation": None,
            "deviation_against": None,
            "extra": dict(case.extra),
        }
        timing = timings.get(case.path)
        if isinstance(timing, str):
            row.update(status="error", reason=timing)
        elif timing is not None:
            median = timing.median
            q1, q3 = timing.quartiles
            row.update(status="ok", median_s=median, q1_s=q1, q3_s=q3, iqr_s=q3 - q1,
                       samples=list(timing.samples), calls_per_sample=timing.number,
                       peak_memory_bytes=timing.peak_bytes)
            if base_median:
                row["ratio"] = median / base_median
            if case.flops:
                row["gflops"] = case.flops / median / 1e9
                if group.matmul_bound and group.workload != "gradcheck":
                    row["peak_fraction"] = row["gflops"] / peaks[group.spec.dtype]
            if case.check is not None:
                try:
                    deviation, against, *facts = case.check(timing.result)
                except Exception as error:  # a broken result is a result too
                    row.update(status="error",
                               reason=f"result check failed: {type(error).__name__}: {error}")
                else:
                    if deviation is not None and not math.isfinite(deviation):
                        row["reason"] = "the check reported a failure"
                        row["extra"]["check_ok"] = False
                    row["deviation"] = _finite(deviation)
                    row["deviation_against"] = against
                    for more in facts:
                        row["extra"].update(more)
            row["extra"].update(_report_facts(timing.result))
        rows.append(row)
    return rows


def _report_facts(result) -> dict:
    """Plain facts a check report carries (verdict, evaluations, Taylor order), for `extra`."""
    facts = {}
    for name in ("ok", "evaluations", "order", "conclusive"):
        value = getattr(result, name, None)
        if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
            value = value.item() if hasattr(value, "item") else value
            if not isinstance(value, float) or math.isfinite(value):
                facts[name] = value
    return facts


def _progress_bar(total: int, stream):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=stream, unit="group", leave=False)
