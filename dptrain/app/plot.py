"""Training curves of one or more runs, read from their ``metrics.jsonl``, drawn with matplotlib.

    dptrain plot runs/d1 runs/d2 -o curves.png

matplotlib is an optional extra (``pip install "dptrain[plot]"``); nothing else in dptrain imports
it. The figure is drawn on the Agg canvas directly (no pyplot, no display, no global state).

Each line of ``metrics.jsonl`` is a JSON object; ``kind`` is ``"step"`` (one training step:
train_loss, lr, samples_per_s, data_ms, forward_ms, backward_ms, exchange_ms, optimizer_ms) or ``"epoch"``
(val_loss, val_accuracy or val_rmse/val_r2, ...); both carry ``step`` and ``epoch``. Any key may
be missing from a row: a curve takes the rows that have it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dptrain.errors import UserError
from dptrain.storage.atomic import check_output_path, write_atomically

METRICS_FILE = "metrics.jsonl"
MISSING_MATPLOTLIB = 'plot needs matplotlib: pip install "dptrain[plot]"'
PHASES = (("data_ms", "data"), ("forward_ms", "forward"), ("backward_ms", "backward"), ("exchange_ms", "exchange"),
          ("optimizer_ms", "optimizer"))


@dataclass
class RunMetrics:
    """The rows of one run's metrics file, split by kind."""

    label: str
    path: Path
    steps: list[dict] = field(default_factory=list)  # kind "step" (or no kind)
    epochs: list[dict] = field(default_factory=list)  # kind "epoch"

    def series(self, key: str, prefer: str = "steps") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows holding a finite number for ``key`` (and a step), in step
        order, from the kind of row (step or epoch) that has more of them: a step row every 50
        steps of a short run gives fewer points than its epoch rows. Ties go to ``prefer``."""
        kinds = (self.steps, self.epochs) if prefer == "steps" else (self.epochs, self.steps)
        candidates = [sorted((row["step"], row[key]) for row in rows if _number(row.get("step"))
                             and _number(row.get(key))) for rows in kinds]
        pairs = max(candidates, key=len)  # the first of equals: the preferred kind
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def median(self, key: str) -> float:
        """Median of ``key`` over the step rows that have it, else over the epoch rows (NaN if none)."""
        for rows in (self.steps, self.epochs):
            values = [row[key] for row in rows if _number(row.get(key))]
            if values:
                return float(np.median(values))
        return math.nan


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_file(run: str | Path) -> Path:
    """A run folder's metrics.jsonl (or the file itself, if given); UserError if there is none."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"run {run}: not found")
    file = path / METRICS_FILE
    if not file.is_file():
        raise UserError(f"run {run}: no {METRICS_FILE} in this folder (is it a run folder, from a dptrain that "
                        f"writes metrics?)")
    return file


def read_metrics(run: str | Path, label: str | None = None) -> RunMetrics:
    """The rows of a run's metrics.jsonl. A last line without its newline (a row being written
    while we read) is skipped; any other line that is not a JSON object is refused, naming it."""
    file = metrics_file(run)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"metrics file {file}: cannot be read ({exc})") from None
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends with a newline
    result = RunMetrics(label or _run_name(run), file)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"metrics file {file}: line {number} is not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise UserError(f"metrics file {file}: line {number} is not a JSON object")
        kind = row.get("kind", "step")
        if kind == "epoch":
            result.epochs.append(row)
        elif kind == "step":
            result.steps.append(row)
    if not result.steps and not result.epochs:
        what = "only a partial line" if partial.strip() else "no rows"
        raise UserError(f"metrics file {file}: {what} (has the run done a step yet?)")
    return result


def _run_name(run: str | Path) -> str:
    path = Path(run).resolve()
    return path.parent.name if path.is_file() else path.name


def _labels(runs: list[str | Path]) -> list[str]:
    """Each run's folder name; the path as given where two runs share a name."""
    names = [_run_name(r) for r in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def _matplotlib():
    """(Figure, FigureCanvasAgg, ticker), or UserError if matplotlib is not installed."""
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg, ticker


def plot_runs(runs: list[str | Path], output: str | Path, title: str | None = None) -> Path:
    """Draw the curves of ``runs`` (run folders or metrics.jsonl files) into the image ``output``.

    Four panels, runs overlaid in one colour each (labelled with the run folder's name): training
    and validation loss, validation accuracy (or RMSE for regression), throughput (samples/s),
    all against the optimizer step, and the median time of a step split into data (taking the
    batch), forward, backward, gradient exchange and optimizer (a metrics file without ``data_ms``,
    from an older dptrain, draws no data part). The image kind follows the suffix (.png, .pdf, .svg,
    ...); the file is written atomically (an existing one is replaced).
    """
    Figure, FigureCanvasAgg, ticker = _matplotlib()
    if not runs:
        raise UserError("plot: no run given")
    output = Path(output)
    metrics = [read_metrics(run, label) for run, label in zip(runs, _labels(runs))]

    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    kinds = canvas.get_supported_filetypes()
    kind = output.suffix.lower().lstrip(".")
    if kind not in kinds:
        raise UserError(f"--output {output}: unknown image kind {output.suffix or '(no suffix)'!r}; expected "
                        f"{', '.join('.' + k for k in sorted(kinds))}")
    check_output_path(output, overwrite=True, example="curves.png")

    grid = fig.add_gridspec(3, 2, height_ratios=[0.07, 1, 1])
    legend_ax = fig.add_subplot(grid[0, :])  # a strip above the panels for the runs' legend
    axes = [fig.add_subplot(grid[1 + i // 2, i % 2]) for i in range(4)]
    colors = {m.label: f"C{i % 10}" for i, m in enumerate(metrics)}
    _loss_panel(axes[0], metrics, colors)
    _metric_panel(axes[1], metrics, colors)
    _throughput_panel(axes[2], metrics, colors, ticker)
    _timing_panel(axes[3], metrics, colors)
    for ax in axes:
        ax.title.set_fontsize(12)
        ax.grid(True, axis="x" if ax is axes[3] else "both", alpha=0.3)
    legend_ax.axis("off")
    legend_ax.legend([_line(colors[m.label]) for m in metrics], [m.label for m in metrics], loc="center",
                     ncol=min(len(metrics), 5), frameon=False, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")

    return write_atomically(output, lambda fh: fig.savefig(fh, format=kind))


def _line(color: str, style: str = "-"):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=style, linewidth=2)


def _line_style(n_points: int) -> dict:
    """Markers on a few points (one per epoch, say); a thinner plain line through many."""
    if n_points <= 25:
        return {"linewidth": 1.8, "marker": "o", "markersize": 3.5}
    return {"linewidth": 1.3}


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}\nin {METRICS_FILE}", ha="center", va="center", multialignment="center",
            transform=ax.transAxes, color="0.45", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _loss_panel(ax, metrics: list[RunMetrics], colors: dict[str, str]) -> None:
    ax.set_title("Loss")
    lows, highs, drawn = [], [], set()
    for m in metrics:
        for key, style, prefer in (("train_loss", "-", "steps"), ("val_loss", "--", "epochs")):
            steps, values = m.series(key, prefer)
            if len(steps):
                ax.plot(steps, values, style, color=colors[m.label], **_line_style(len(steps)), alpha=0.9)
                drawn.add(key)
                positive = values[values > 0]
                if len(positive):
                    lows.append(positive.min())
                    highs.append(positive.max())
    if not drawn:
        _no_data(ax, "train_loss or val_loss")
        return
    if lows and max(highs) / min(lows) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    styles = [(key, style) for key, style in (("train_loss", "-"), ("val_loss", "--")) if key in drawn]
    ax.legend([_line("0.3", style) for _, style in styles], [key.replace("_", " ") for key, _ in styles],
              loc="upper right", fontsize=9)


def _metric_panel(ax, metrics: list[RunMetrics], colors: dict[str, str]) -> None:
    """Validation accuracy if any run reports it, else validation RMSE."""
    key = next((k for k in ("val_accuracy", "val_rmse") if any(len(m.series(k, "epochs")[0]) for m in metrics)), None)
    if key is None:
        ax.set_title("Validation accuracy / RMSE")
        _no_data(ax, "val_accuracy or val_rmse")
        return
    ax.set_title("Validation accuracy" if key == "val_accuracy" else "Validation RMSE")
    last = []
    for m in metrics:
        steps, values = m.series(key, "epochs")
        if len(steps):
            ax.plot(steps, values, "-", color=colors[m.label], **_line_style(len(steps)))
            last.append((m.label, values[-1]))
    corner = (0.98, 0.04) if key == "val_accuracy" else (0.98, 0.96)  # away from where the curves go
    for i, (label, value) in enumerate(last[::-1] if key == "val_accuracy" else last):  # first run on top
        y = corner[1] + (i * 0.065 if key == "val_accuracy" else -i * 0.065)
        ax.text(corner[0], y, f"last {value:.4f}  {label}", transform=ax.transAxes, ha="right",
                va="bottom" if key == "val_accuracy" else "top", color=colors[label], fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5})
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy" if key == "val_accuracy" else "RMSE")


def _throughput_panel(ax, metrics: list[RunMetrics], colors: dict[str, str], ticker) -> None:
    ax.set_title("Throughput")
    drawn = False
    for m in metrics:
        steps, values = m.series("samples_per_s", "steps")
        if len(steps):
            ax.plot(steps, values, "-", color=colors[m.label], **_line_style(len(steps)))
            drawn = True
    if not drawn:
        _no_data(ax, "samples_per_s")
        return
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")


def _timing_panel(ax, metrics: list[RunMetrics], colors: dict[str, str]) -> None:
    """One horizontal bar per run: the median milliseconds of each phase of a step, stacked."""
    ax.set_title("Time per step (median), by phase")
    medians = np.array([[m.median(key) for key, _ in PHASES] for m in metrics])
    if np.isnan(medians).all():
        _no_data(ax, "step timings (data_ms, forward_ms, backward_ms,\nexchange_ms, optimizer_ms)")
        return
    medians = np.nan_to_num(medians)
    y = np.arange(len(metrics))[::-1]
    left = np.zeros(len(metrics))
    phase_colors = ("#8172b3", "#4c72b0", "#dd8452", "#c44e52", "#55a868")
    for j, (_, name) in enumerate(PHASES):
        ax.barh(y, medians[:, j], left=left, height=0.6, color=phase_colors[j], label=name)
        left += medians[:, j]
    for yi, total in zip(y, left):
        ax.annotate(f"{total:.3g} ms", (total, yi), textcoords="offset points", xytext=(4, 0), va="center", fontsize=9)
    ax.set_yticks(y, [m.label for m in metrics])
    for tick, m in zip(ax.get_yticklabels(), metrics):
        tick.set_color(colors[m.label])
    ax.set_xlim(0, left.max() * 1.2 if left.max() > 0 else 1)
    n = len(metrics)
    ax.set_ylim(-0.5, n - 0.5 + max(0.7, 0.12 * n))  # headroom for the legend above the bars
    ax.set_xlabel("milliseconds per step")
    ax.legend(loc="upper right", fontsize=9, ncol=len(PHASES))
