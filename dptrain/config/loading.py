"""Loading a config: TOML (a file or a built-in name), ``--set key=value`` overrides, and building the
frozen dataclasses with errors that name the file and the key."""

from __future__ import annotations

import os
import sys
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dptrain.errors import UserError

from .schema import Config
from .validation import validate

_BUILTIN = resources.files("dptrain.config") / "builtin"


def _describe_type(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return f"a list of {_describe_type(get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    bad = UserError(f"{where}: {key} must be {_describe_type(tp)}, got {value!r}")
    if get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_type, _) = get_args(tp)
        return tuple(_coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:
            raise bad from None
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict:  # a layer table: checked key by key in dptrain.config.layers
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(tp)  # pragma: no cover - a dataclass field of an unsupported type


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise UserError(f"{where}: unknown key {prefix}{unknown[0]} (known keys: "
                        f"{', '.join(prefix + k for k in sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1). The value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer literal too long to convert
        value = raw.strip()
    return key.split("."), value


def builtin_configs() -> dict[str, str]:
    """The configs shipped with dptrain: {name: the first sentence of its leading comment}, by name.
    A name works as ``--config NAME``; the files are the repository's ``configs/``."""
    found = {}
    for item in sorted(_BUILTIN.iterdir(), key=lambda t: t.name):
        if item.name.endswith(".toml"):
            words = []
            for line in item.read_text(encoding="utf-8").splitlines():
                if not line.startswith("#") or line.startswith("#  "):  # the comment ends, or a command follows
                    break
                words.append(line.lstrip("#").strip())
            text = " ".join(words)
            end = text.find(". ")
            found[item.name[: -len(".toml")]] = text if end < 0 else text[: end + 1]
    return found


def read_config_file(path: str) -> tuple[dict[str, Any], str]:
    """(the TOML tree, how errors name it) of ``path``, or of the built-in config ``path`` names
    when no such file exists (``digits_cnn`` or ``digits_cnn.toml``)."""
    name = path[: -len(".toml")] if path.endswith(".toml") else path
    builtin = _BUILTIN / f"{name}.toml"
    if not Path(path).is_file() and "/" not in path and os.sep not in path and builtin.is_file():
        return tomllib.loads(builtin.read_text(encoding="utf-8")), f"config {name} (built-in)"
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh), f"config {path}"
    except FileNotFoundError:
        known = ", ".join(builtin_configs())
        raise UserError(f"config {path}: not found (nor a built-in config: {known})") from None
    except IsADirectoryError:
        raise UserError(f"config {path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise UserError(f"config {path}: cannot be read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
        raise UserError(f"config {path}: not valid TOML ({exc})") from None


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The default config, updated by the TOML file at ``path`` (or a built-in config's name), then
    by ``--set`` overrides."""
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        tree, where = read_config_file(str(path))
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text}: {k} is not a table")
        node[keys[-1]] = value
    config = _build(Config, tree, "", where if not overrides else f"{where} (with --set)")
    validate(config, where)
    return config


def config_from_dict(tree: dict[str, Any], where: str = "config") -> Config:
    """Rebuild a config from ``Config.to_dict()`` output (e.g. a checkpoint's meta.json)."""
    config = _build(Config, tree, "", where)
    validate(config, where)
    return config
