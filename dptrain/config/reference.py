"""The configuration reference, generated from the schema: every table and key with its type, its
default and the comment beside it in :mod:`dptrain.config.schema`, and the keys of every layer
table. ``dptrain config reference`` prints it; docs/config-reference.md is its output, and a test
fails when the committed file is stale."""

from __future__ import annotations

import inspect
import io
import re
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

from dptrain.optim import SCHEDULES

from . import schema
from .layers import layer_tables
from .schema import Config, _toml_value

HEADER = """# Configuration reference

Generated from the config schema (`dptrain/config/schema.py`) by `dptrain config reference`; do not
edit by hand. A config is a TOML file (or a built-in name, `dptrain config list`) whose keys override
these defaults; `--set section.key=value` overrides a key on the command line. An unknown key, a
value of the wrong type or out of range is refused with a one-line error naming the key (exit 2).
`dptrain config show` prints the resolved config; `dptrain config validate` checks it and its data.
"""


#: the keys whose value is one of a list of names, and that list (the registries the checks use)
CHOICES = {
    "data.name": schema.DATASETS,
    "model.activation": schema.ACTIVATION_NAMES,
    "train.loss": schema.LOSS_NAMES,
    "train.dtype": schema.DTYPES,
    "optim.name": schema.OPTIMIZER_NAMES,
    "optim.schedule": SCHEDULES,
    "early_stopping.metric": schema.MONITORED_METRICS,
    "comm.compression": schema.COMPRESSIONS,
}


def field_comments(cls: type) -> dict[str, str]:
    """{field: its documentation}: the comment after the field, or the comment lines just above it."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    above: list[str] = []
    line_comment: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        m = re.match(r"(\w+)\s*:", stripped)
        if stripped.startswith("#"):
            above.append(line_comment.get(number, ""))
        elif m and not stripped.startswith(("def ", "class ", '"""')):
            text = line_comment.get(number) or " ".join(above)
            comments[m.group(1)] = text
            above = []
        else:
            above = []
    return comments


def _type_text(tp: Any) -> str:
    if get_origin(tp) is tuple:
        item = get_args(tp)[0]
        return "list of tables" if item is dict else f"list of {_type_text(item)}"
    return {int: "integer", float: "number", bool: "boolean", str: "string", dict: "table"}.get(tp, str(tp))


def _default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    hints = get_type_hints(cls)
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            continue
        default = _toml_value(_default(f))
        rows.append(f"| `{prefix}{f.name}` | {_type_text(hints[f.name])} | `{_cell(default)}` | "
                    f"{_cell(comments.get(f.name, ''))} |")
    return rows


def _doc(section: type) -> str:
    """A section's docstring after its "[name]:", capitalised, on one line."""
    doc = " ".join((inspect.getdoc(section) or "").split(":", 1)[-1].split())
    return doc[:1].upper() + doc[1:]


def reference_markdown() -> str:
    """The whole reference, as Markdown."""
    out = [HEADER]
    hints = get_type_hints(Config)
    out += ["## Top level", "", *_table(Config, ""), ""]
    for f in fields(Config):
        section = hints[f.name]
        if not is_dataclass(section):
            continue
        out += [f"## [{f.name}]", "", _doc(section), "", *_table(section, f"{f.name}."), ""]
        inner = get_type_hints(section)
        for g in fields(section):  # a table inside the section, e.g. [data.augment]
            if is_dataclass(inner[g.name]):
                name = f"{f.name}.{g.name}"
                out += [f"### [{name}]", "", _doc(inner[g.name]), "", *_table(inner[g.name], f"{name}."), ""]
    out += ["## Layer tables (`model.layers`)", "",
            "Each table has a `type` and that type's keys; the output layer is added after the last one.",
            'A size is an integer or a pair `[h, w]`. Example: `{type = "conv2d", filters = 16, kernel = 3, '
            'padding = 1}`.', "", "| type | keys (required in bold) |", "|---|---|"]
    for kind, (_, keys) in sorted(layer_tables().items()):
        described = []
        for key, spec in keys.items():
            kind_text = spec.kind if isinstance(spec.kind, str) else " \\| ".join(spec.kind)
            text = f"`{key}` ({kind_text})"
            described.append(f"**{text}**" if spec.required else text)
        out.append(f"| `{kind}` | {', '.join(described) or 'none'} |")
    out.append("")
    out += ["## Choices", ""]
    for key, choices in CHOICES.items():
        out.append(f"- `{key}`: {', '.join(choices)}")
    return "\n".join(out) + "\n"
