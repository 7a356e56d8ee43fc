"""Rendering a result document: the text table and the PNG scaling plot."""

from __future__ import annotations

import textwrap
from dataclasses import fields

from .models import MLPSpec, forward_flops

__all__ = ["format_header", "format_table", "format_targets", "format_report", "write_plot",
           "DEVIATION_FLAG"]

#: grad and jacobian rows whose deviation exceeds this (per dtype) are flagged with
#: "!" in the table; a gradcheck row is judged by its own verdict instead.
DEVIATION_FLAG = {"float64": 1e-6, "float32": 1e-2}


def _time(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _bytes(count) -> str:
    if count is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def _number(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def format_header(doc: dict) -> str:
    """The machine, versions, BLAS/threads and method lines."""
    machine = doc["machine"]
    lines = [
        f"jacobprop bench  ({doc['command']})",
        f"machine : {machine['cpu']}, {machine['cores']} cores, {machine.get('platform', '')}",
        f"versions: Python {machine['python']}, numpy {machine['numpy']}, "
        f"scipy {machine['scipy']}, jacobprop {machine['jacobprop']}",
    ]
    for blas in machine["blas"] or [{"library": "unknown", "version": "?", "threads": 0,
                                     "source": "no threadpoolctl, no numpy config"}]:
        threads = blas["threads"] or "?"
        described = " ".join(
            text for text in (blas["library"], blas["version"], blas.get("architecture"))
            if text and text not in ("None", "?")
        )
        lines.append(f"BLAS    : {described}, {threads} threads  [{blas['source']}]")
    load = machine.get("load_average")
    if load:
        busy = "  (other processes are competing: expect noisy timings)" \
            if load[0] > 0.75 * machine["cores"] else ""
        lines.append(f"load    : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start{busy}")
    if machine["env"]:
        env = ", ".join(f"{key}={value}" for key, value in machine["env"].items())
        lines.append(f"env     : {env}")
    peaks = ", ".join(f"{dtype} {value:.1f} GFLOP/s" for dtype, value in
                      doc["matmul_peak_gflops"].items())
    lines.append(f"matmul peak (1024^3 product, best of 5): {peaks}")
    if doc["peers"]:
        lines.append("peers   : " + ", ".join(f"{k} {v}" for k, v in doc["peers"].items()))
    method = doc["method"]
    lines.append(
        f"method  : warm-up, {method['repeats']} interleaved rounds (slow paths: fewer, "
        f">= 3, spread evenly), median and IQR of per-call time; "
        f"memory = {method['memory']}"
    )
    return "\n".join(lines)


_SPEC_KEYS = tuple(field.name for field in fields(MLPSpec))
_COLUMNS = ("path", "median", "IQR", "x base", "GFLOP/s", "% peak", "peak mem", "max rel dev")


def format_table(doc: dict) -> str:
    """One block per group: its rows with median, IQR, ratio, GFLOP/s, memory, deviation."""
    blocks = []
    rows_by_group = {}
    for row in doc["rows"]:
        rows_by_group.setdefault(row["group"], []).append(row)
    for group in doc["groups"]:
        title = (f"[{group['workload']}] {group['label']}  "
                 f"(baseline: {group['baseline']}; dev vs {group['deviation_against']})")
        extra = group.get("extra", {})
        if "cost_estimate" in extra:
            costs = ", ".join(f"{k} {v:.3g}" for k, v in extra["cost_estimate"].items())
            title += f"\n  engine cost estimate (flop): {costs}"
        if "plan" in extra:
            title += f"\n  plan: {extra['plan']}"
        table = [_COLUMNS]
        notes = []
        flag = DEVIATION_FLAG[group["config"]["dtype"]]
        for row in rows_by_group.get(group["index"], []):
            if row["status"] != "ok":
                table.append((row["path"], row["status"]) + ("",) * 6)
                notes.append(f"  {row['path']}: {row['status']}: {row['reason']}")
                continue
            deviation = row["deviation"]
            if row["deviation_against"] not in (None, group["deviation_against"]):
                notes.append(f"  {row['path']}: dev vs {row['deviation_against']}")
            if row["extra"].get("check_ok") is False:
                dev_text = "CHECK FAILED"
            elif deviation is None:
                dev_text = "-" if row["extra"].get("ok", True) else "CHECK FAILED"
            else:
                flagged = deviation > flag and group["workload"] != "gradcheck"
                dev_text = f"{deviation:.1e}" + (" !" if flagged else "")
            fraction = row["peak_fraction"]
            table.append((
                row["path"],
                _time(row["median_s"]),
                _time(row["iqr_s"]),
                _number(row["ratio"], ".2f"),
                _number(row["gflops"], ".3g"),
                "-" if fraction is None else f"{100 * fraction:.0f}%",
                _bytes(row["peak_memory_bytes"]),
                dev_text,
            ))
        notes.extend(_fastest_peer_note(group, rows_by_group.get(group["index"], [])))
        notes.extend(_ranking_note(group, rows_by_group.get(group["index"], [])))
        widths = [max(len(str(line[i])) for line in table) for i in range(len(_COLUMNS))]
        rendered = [
            "  " + "  ".join(str(cell).rjust(w) if i else str(cell).ljust(w)
                             for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
            for line in table
        ]
        blocks.append("\n".join([title] + rendered + notes))
    return "\n\n".join(blocks)


def _fastest_peer_note(group: dict, rows: list) -> list[str]:
    """`baseline / fastest peer (name): ratio`, when a peer row and the baseline ran."""
    medians = {row["path"]: row["median_s"] for row in rows if row["status"] == "ok"}
    peers = {row["path"]: row["median_s"] for row in rows
             if row["status"] == "ok" and row["peer"] is not None}
    base = medians.get(group["baseline"])
    if not peers or not base:
        return []
    name = min(peers, key=peers.get)
    return [f"  {group['baseline']} / fastest peer ({name}): {base / peers[name]:.2f}"]


def _ranking_note(group: dict, rows: list, tie: float = 0.10) -> list[str]:
    """The cost model's ranking of forward and reverse against the measured one.

    Orders whose predicted flops or measured medians lie within `tie` of each
    other count as tied; a tie on either side agrees with anything.
    """
    predicted = group.get("extra", {}).get("cost_estimate")
    if not isinstance(predicted, dict):
        return []
    medians = {row["path"]: row["median_s"] for row in rows if row["status"] == "ok"}
    if not all(order in predicted and order in medians for order in ("forward", "reverse")):
        return []

    def verdict(values):
        low, high = sorted(values.values())
        if high <= low * (1 + tie):
            return "tie"
        return min(values, key=values.get)

    model = verdict({order: predicted[order] for order in ("forward", "reverse")})
    measured = verdict({order: medians[order] for order in ("forward", "reverse")})
    agree = "tie" in (model, measured) or model == measured
    return [f"  cheaper order: predicted {model}, measured {measured}"
            f" ({'agree' if agree else 'DISAGREE'})"]


def format_targets(doc: dict) -> str:
    """The speed targets that this run measured, with their verdicts."""
    if not doc["targets"]:
        return ""
    lines = ["targets:"]
    for target in doc["targets"]:
        if target["measured"] is None:
            lines.append(f"  [ ?? ] {target['name']}: not measured ({target['note']})")
            continue
        verdict = "PASS" if target["met"] else "MISS"
        lines.append(f"  [{verdict}] {target['name']}: {target['measured']:.2f} "
                     f"{target['relation']} {target['limit']:g}")
    return "\n".join(lines)


def format_report(doc: dict) -> str:
    """Header, tables and targets, ready to print."""
    parts = [format_header(doc), format_table(doc)]
    targets = format_targets(doc)
    if targets:
        parts.append(targets)
    parts.append("ratio: median / the group's baseline median.  % peak: only where "
                 "matmul-bound (batch and width >= 32).  ! = deviation above "
                 f"{DEVIATION_FLAG['float64']:g} (float64) / {DEVIATION_FLAG['float32']:g} "
                 f"(float32).  elapsed {doc['elapsed_s']:.1f} s")
    return "\n\n".join(parts) + "\n"


def _size(group: dict) -> float:
    """The x coordinate of a group in the scaling plot."""
    config = group["config"]
    if group["workload"] == "gradcheck":
        return config["n_params"]
    return forward_flops(MLPSpec(**{key: config[key] for key in _SPEC_KEYS}))


def write_plot(doc: dict, path: str) -> None:
    """A log-log PNG: median time per path against problem size, one panel per workload.

    matplotlib is imported here, so the rest of the package does not need it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    workloads = [w for w in ("grad", "jacobian", "gradcheck")
                 if any(g["workload"] == w for g in doc["groups"])]
    panels = max(len(workloads), 1)
    figure, axes = plt.subplots(1, panels, figsize=(max(7.0, 5.5 * panels), 5.0),
                                squeeze=False)
    xlabels = {"grad": "forward matmul flops (2 B sum n_l m_l)",
               "jacobian": "forward matmul flops (2 B sum n_l m_l)",
               "gradcheck": "parameters checked"}
    for axis, workload in zip(axes[0], workloads, strict=False):
        groups = {g["index"]: g for g in doc["groups"] if g["workload"] == workload}
        series: dict[str, list[tuple[float, float]]] = {}
        for row in doc["rows"]:
            if row["group"] in groups and row["status"] == "ok":
                key = f"{row['path']} ({groups[row['group']]['config']['dtype']})"
                series.setdefault(key, []).append((_size(groups[row["group"]]),
                                                   row["median_s"]))
        for key, points in sorted(series.items()):
            points.sort()
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o", label=key)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(xlabels[workload])
        axis.set_ylabel("median time per call (s)")
        axis.set_title(f"jacobprop bench {workload}")
        axis.grid(True, which="both", alpha=0.3)
        if series:
            axis.legend(fontsize=7)
    cpu = doc["machine"]["cpu"]
    title = f"{doc['command']}  --  {cpu}, {doc['machine']['cores']} cores"
    figure.suptitle(textwrap.fill(title, width=int(12 * figure.get_figwidth())), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
