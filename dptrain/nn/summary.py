"""A model's layer table: each layer, the shape of one sample after it, and its parameter count."""

from __future__ import annotations

from .model import Sequential


def summary_table(model: Sequential) -> list[str]:
    """Lines of the table ``dptrain model summary`` prints, ending with the totals line, e.g.::

        #  layer        output shape  parameters
           input        (64,)
        0  Dense(64, 128)  (128,)        8,320
        total: 9,610 parameters (0.04 MiB as float32)
    """
    rows = [("#", "layer", "output shape", "parameters"), ("", "input", shape_text(model.in_shape), "")]
    for path, desc, shape, count in model.summary():
        indent = "  " * path.count(".body.") + "  " * path.count(".shortcut.")  # nested: indented under its block
        rows.append((path, indent + desc, shape_text(shape), f"{count:,}"))
    widths = [max(len(r[j]) for r in rows) for j in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}".rstrip() for r in rows]
    n_buffers = len(model.state_buffer)
    lines.append(f"total: {model.n_params:,} parameters ({model.n_params * model.dtype.itemsize / 2**20:.2f} MiB "
                 f"as {model.dtype})" + (f", {n_buffers:,} buffer values" if n_buffers else ""))
    return lines


def shape_text(shape: tuple[int, ...]) -> str:
    """(1, 8, 8) -> "(1, 8, 8)"; (64,) -> "(64)"."""
    return "(" + ", ".join(str(d) for d in shape) + ")"
