"""The benchmark's report: merged runs, the table, the per-layer table, strict JSON."""

from __future__ import annotations

import json
import math
import platform
from typing import Any

import numpy as np

from dptrain._version import __version__
from dptrain.runtime.sysinfo import cpu_info

from .kernel import mlp_layers


def make_report(workload: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of ``runs``, with the scaling efficiency of each relative to the 1-rank run."""
    base = next((r for r in runs if r["ranks"] == 1), None)
    for r in runs:
        r["efficiency"] = (r["samples_per_s"] / (r["ranks"] * base["samples_per_s"])) if base else None
    first = runs[0]
    machine_cpu = cpu_info()
    return {
        "dptrain_version": __version__,
        "workload": workload,
        "runs": runs,
        "threads_per_rank": {str(r["ranks"]): r["threads_per_rank"] for r in runs},
        "blas": first["blas"][0] if first["blas"] else None,
        "mpi": first["mpi"],
        "machine": {"cpu": machine_cpu["model"], "cores": machine_cpu["cores"],
                    "python": platform.python_version(), "numpy": np.__version__},
    }


def describe_model(model) -> str:
    """``MLP 784-1024-1024-10 relu`` for a Dense/activation stack, else the layers' descriptions."""
    layers = mlp_layers(model)
    if layers is None:
        return " -> ".join(layer.describe() for layer in model.layers)
    widths = [model.in_features] + [w.shape[1] for kind, w in layers if kind == "dense"]
    activations = sorted({kind for kind, _ in layers if kind != "dense"})
    return f"MLP {'-'.join(map(str, widths))}" + (f" {'/'.join(activations)}" if activations else "")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """Two lines about the workload and the machine, then one row per world size."""
    w, m, blas = report["workload"], report["machine"], report["blas"]
    batch = (f"{w['batch']['per_rank']} samples per rank per step" if "per_rank" in w["batch"]
             else f"global batch {w['batch']['global']}")
    o = w["optimizer"]
    head = (f"workload: {w['name']}: {w['model']} ({w['n_params']:,} parameters), {w['loss']}, "
            f"{o['name']} lr {o['lr']:g} momentum {o['momentum']:g}, {w['dtype']}, {batch}, data {w['data']['source']}; "
            f"{w['steps']} timed steps after {w['warmup']} warmup")
    blas_text = (f"{blas['internal_api']} {blas['version']} ({blas['architecture']} kernels, {blas['threading_layer']})"
                 if blas else "none found")
    threads = "; ".join(f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}: {r['threads_per_rank']} "
                        f"[{r['threads_set_by']}]" for r in report["runs"])
    machine = (f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, NumPy {m['numpy']}, "
               f"BLAS {blas_text}; MPI {report['mpi']}; BLAS/OpenMP threads per rank: {threads}")
    columns = ["ranks", "samples/s", "step ms", "data ms", "fwd ms", "bwd ms", "exch ms", "opt ms",
               "kernel samples/s", "overhead %", "peak RSS MB", "efficiency"]
    rows = []
    for r in report["runs"]:
        p, k = r["phases_ms"], r["kernel"]
        rows.append([str(r["ranks"]), _fmt(r["samples_per_s"], ",.0f"), _fmt(r["step_ms"], ".2f"),
                     _fmt(p["data"], ".2f"), _fmt(p["forward"], ".2f"), _fmt(p["backward"], ".2f"),
                     _fmt(p["exchange"], ".2f"), _fmt(p["optimizer"], ".2f"), _fmt(k["samples_per_s"] if k else None, ",.0f"),
                     _fmt(r["overhead_pct"], ".1f"), _fmt(r["peak_rss_mb"]["max"], ".0f"),
                     _fmt(r["efficiency"], ".2f")])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = [head, machine, "  ".join(c.rjust(n) for c, n in zip(columns, widths))]
    lines += ["  ".join(v.rjust(n) for v, n in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def format_layers(run: dict[str, Any]) -> str:
    """One run's per-layer table: each layer's forward and backward milliseconds per step, its matrix
    products' milliseconds in the bare kernel, what the layer spends beyond them, and its share of the
    step (the layers alone: the loss, the exchange and the optimizer are in the table above)."""
    rows = run["layers"]
    step = sum(r["forward_ms"] + r["backward_ms"] for r in rows) or math.nan
    header = ["#", "layer", "output", "fwd ms", "bwd ms", "matmul ms", "beyond ms", "% of layers"]
    table = []
    for i, r in enumerate(rows):
        total = r["forward_ms"] + r["backward_ms"]
        beyond = total - r["matmul_ms"] if r["matmul_ms"] is not None else None
        table.append([str(i), r["layer"], "x".join(map(str, r["output_shape"])), _fmt(r["forward_ms"], ".2f"),
                      _fmt(r["backward_ms"], ".2f"), _fmt(r["matmul_ms"], ".2f"), _fmt(beyond, ".2f"),
                      _fmt(100 * total / step, ".1f")])
    table.append(["", "all layers", "", _fmt(sum(r["forward_ms"] for r in rows), ".2f"),
                  _fmt(sum(r["backward_ms"] for r in rows), ".2f"),
                  _fmt(sum(r["matmul_ms"] or 0.0 for r in rows), ".2f"), "", ""])
    widths = [max(len(h), *(len(row[j]) for row in table)) for j, h in enumerate(header)]
    align = [str.rjust, str.ljust, str.ljust, *[str.rjust] * 5]
    lines = [f"per layer at {run['ranks']} rank{'s' if run['ranks'] > 1 else ''} (ms per step, mean over the ranks):"]
    lines += ["  ".join(a(v, n) for a, v, n in zip(align, row, widths)).rstrip() for row in [header, *table]]
    return "\n".join(lines)


def _json_clean(value: Any) -> Any:
    """NaN and infinities as null, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_clean(v) for v in value]
    return value


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_json_clean(report), allow_nan=False)
