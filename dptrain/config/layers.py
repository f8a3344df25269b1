"""``model.layers`` tables of a config -> layer objects, with errors that name the table and key.

Each table has a ``type`` and that type's keys, e.g.::

    [model]
    layers = [
      {type = "conv2d", filters = 16, kernel = 3, padding = 1},
      {type = "batchnorm"},
      {type = "relu"},
      {type = "maxpool2d", pool = 2},
      {type = "flatten"},
      {type = "dense", units = 64},
      {type = "dropout", rate = 0.25},
    ]

The output layer is added by :func:`dptrain.app.build.build_model`, as for ``model.hidden``: a Dense
layer as wide as the classes or target columns, after a Flatten if the last shape is not flat.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dptrain.errors import UserError
from dptrain.nn import conv, dropout, embedding, norm, pooling
from dptrain.nn import layers as L
from dptrain.nn.attention import MultiHeadSelfAttention
from dptrain.nn.recurrent import GRU, OUTPUTS
from dptrain.nn.residual import Residual
from dptrain.nn.windows import as_pair


@dataclass(frozen=True)
class Key:
    """One key of a layer table: its kind ("int", "float", "bool", "size" = an int or a pair of ints,
    "layers" = a list of layer tables, "init or std" = a name of INITS or a number, or a tuple of allowed
    strings), whether it is required, and the constructor argument it feeds."""

    kind: Any
    required: bool = False
    arg: str | None = None  # the constructor's name for it, if not the same


#: the keys of the activations (of ``dptrain.nn.ACTIVATIONS``) that take arguments
_ACTIVATION_KEYS = {"leaky_relu": {"negative_slope": Key("float")}}


def layer_tables() -> dict[str, tuple[Callable[..., L.Layer], dict[str, Key]]]:
    """{type: (the layer class, {key: Key})} of every layer a ``model.layers`` table can make."""
    init = Key(L.INITS)
    pool = {"pool": Key("size", required=True), "stride": Key("size")}
    pool1d = {"pool": Key("int", required=True), "stride": Key("int")}  # sequences: ints, not pairs
    return {
        "dense": (L.Dense, {"units": Key("int", True, arg="out_features"), "init": init, "bias": Key("bool")}),
        "conv2d": (conv.Conv2D, {"filters": Key("int", True), "kernel": Key("size", True), "stride": Key("size"),
                                 "padding": Key("size"), "init": init, "bias": Key("bool")}),
        "maxpool2d": (pooling.MaxPool2D, pool),
        "avgpool2d": (pooling.AvgPool2D, pool),
        "conv1d": (conv.Conv1D, {"filters": Key("int", True), "kernel": Key("int", True), "stride": Key("int"),
                                 "padding": Key("int"), "init": init, "bias": Key("bool")}),
        "maxpool1d": (pooling.MaxPool1D, pool1d),
        "avgpool1d": (pooling.AvgPool1D, pool1d),
        "embedding": (embedding.Embedding, {"dim": Key("int", True), "vocab": Key("int"), "init_std": Key("float")}),
        "position_embedding": (embedding.PositionEmbedding, {"init_std": Key("float")}),
        "attention": (MultiHeadSelfAttention, {"heads": Key("int", True), "causal": Key("bool"), "init": Key("init or std"),
                                               "bias": Key("bool")}),
        "gru": (GRU, {"units": Key("int", True, arg="hidden"), "bidirectional": Key("bool"), "output": Key(OUTPUTS)}),
        "flatten": (conv.Flatten, {}),
        "globalavgpool": (pooling.GlobalAvgPool, {}),
        "residual": (Residual, {"layers": Key("layers", True, arg="body"), "shortcut": Key("layers")}),
        "batchnorm": (norm.BatchNorm, {"momentum": Key("float"), "eps": Key("float")}),
        "layernorm": (norm.LayerNorm, {"eps": Key("float"), "over": Key(norm.LAYERNORM_OVER)}),
        "dropout": (dropout.Dropout, {"rate": Key("float", True)}),
        **{name: (cls, _ACTIVATION_KEYS.get(name, {})) for name, cls in L.ACTIVATIONS.items()},
    }


def _value(kind: Any, value: Any, key: str) -> Any:
    def bad(expected: str) -> UserError:
        return UserError(f"{key} must be {expected}, got {value!r}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "int":
        if not is_int:
            raise bad("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind == "layers":  # a list of layer tables: made by make_layer, under this key's path
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
            raise bad("a list of layer tables")
    elif kind == "init or std":  # a weight initialisation's name, or the std of a normal one (the layer checks > 0)
        if value not in L.INITS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad("one of " + ", ".join(repr(k) for k in L.INITS) + " or a number (a std)")
        value = value if isinstance(value, str) else float(value)
    elif kind == "size":  # the layer checks the range
        try:
            as_pair(value, key)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    elif value not in kind:
        raise bad("one of " + ", ".join(repr(k) for k in kind))
    return value


def make_layer(table: dict[str, Any], index: int, seed: int = 0, where: str | None = None) -> L.Layer:
    """The layer of ``model.layers[index]`` (or of the table at ``where``, inside a block); UserError
    naming the key for anything wrong.

    Dropout gets ``seed`` and a salt of its own: its index for a top-level table, a hash of its path
    inside a block, so two Dropout layers never share a mask and a run's masks depend only on the config.
    """
    where = where or f"model.layers[{index}]"
    types = layer_tables()
    kind = table.get("type")
    if not isinstance(kind, str) or kind not in types:
        raise UserError(f"{where}.type is {kind!r}; expected one of {', '.join(sorted(types))}")
    factory, keys = types[kind]
    unknown = [k for k in table if k != "type" and k not in keys]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for type {kind!r} "
                        f"(known: {', '.join(keys) or 'none'})")
    missing = [k for k, spec in keys.items() if spec.required and k not in table]
    if missing:
        raise UserError(f"{where}: type {kind!r} needs {missing[0]!r}")
    kwargs = {(spec.arg or k): _value(spec.kind, table[k], f"{where}.{k}")
              for k, spec in keys.items() if k in table}
    for key, spec in keys.items():
        if spec.kind == "layers" and key in table:  # the tables of a block, made under their own paths
            kwargs[spec.arg or key] = [make_layer(t, j, seed, f"{where}.{key}[{j}]") for j, t in enumerate(table[key])]
    if kind == "dropout":
        salt = index if where == f"model.layers[{index}]" else zlib.crc32(where.encode())
        kwargs.update(seed=seed, salt=salt)
    try:
        return factory(**kwargs)
    except ValueError as exc:
        raise UserError(f"{where} ({kind}): {exc}") from None
