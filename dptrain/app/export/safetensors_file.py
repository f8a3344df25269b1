"""A model's weights as a ``.safetensors`` file, and back.

safetensors is a flat map of named tensors with a JSON header, read without running any code (no
pickle). Two layouts:

* ``dptrain`` (the default): dptrain's names and shapes, every parameter and buffer
  (``layers.0.weight`` of shape (in, out), ``layers.3.body.1.running_mean``, ...): what
  ``dptrain train --init-from`` loads, for any model;
* ``torch``: the names and layouts of the equivalent ``torch.nn.Sequential``, for models of
  Dense, Conv1D/Conv2D, BatchNorm, LayerNorm, Embedding and the layers without parameters:

  ========================  ===================================  ==============================
  dptrain layer i           torch module i                       tensors
  ========================  ===================================  ==============================
  Dense                     Linear                               ``i.weight`` (out, in): the
                                                                 transpose; ``i.bias``
  Conv2D / Conv1D           Conv2d / Conv1d                      ``i.weight`` (out, in, *k),
                                                                 ``i.bias``: as they are
  BatchNorm                 BatchNorm1d / BatchNorm2d            ``i.weight``, ``i.bias``,
                                                                 ``i.running_mean``,
                                                                 ``i.running_var``,
                                                                 ``i.num_batches_tracked`` (0)
  LayerNorm                 LayerNorm (sample shape or last      ``i.weight``, ``i.bias``
                            axis)
  Embedding                 Embedding                            ``i.weight`` (vocab, dim)
  activations, Dropout,     ReLU, Tanh, ..., Dropout, Flatten,   none
  Flatten, pooling          MaxPool2d, ...; GlobalAvgPool:
                            Sequential(AdaptiveAvgPool2d(1),
                            Flatten())
  ========================  ===================================  ==============================

  so ``torch_model.load_state_dict(safetensors.torch.load_file(path))`` loads it into the
  ``nn.Sequential`` whose module i stands for layer i (the header's ``torch_modules`` lists them).
  Residual blocks, attention, the GRU and position embeddings are refused in this layout (they have
  no single torch module to sit in a Sequential).

The header's metadata (strings): ``format`` "dptrain", ``layout``, ``version``, ``in_shape`` and
``out_shape`` (JSON), ``dtype``, ``step``, ``layers`` (JSON: each layer's description) and
``config`` (the run's resolved config, JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dptrain._version import __version__
from dptrain.errors import UserError
from dptrain.nn import (
    GELU,
    AvgPool1D,
    AvgPool2D,
    BatchNorm,
    Conv1D,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    LayerNorm,
    LeakyReLU,
    MaxPool1D,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)

LAYOUTS = ("dptrain", "torch")
_WITHOUT_PARAMETERS = (ReLU, Tanh, Sigmoid, LeakyReLU, GELU, Dropout, Flatten, MaxPool1D, MaxPool2D, AvgPool1D,
                       AvgPool2D, GlobalAvgPool)


def model_tensors(model: Sequential, layout: str = "dptrain") -> dict[str, np.ndarray]:
    """{name: array} of the model's parameters and buffers in ``layout`` (contiguous copies)."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if layout == "dptrain":
        return {name: np.ascontiguousarray(a) for name, a in model.state_arrays().items()}
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.layers):
        _check_torch_layer(i, layer)
        for key, array in {**layer.params, **layer.buffers}.items():
            tensors[f"{i}.{key}"] = np.ascontiguousarray(array.T if isinstance(layer, Dense) and key == "weight"
                                                         else array)
        if isinstance(layer, BatchNorm):
            tensors[f"{i}.num_batches_tracked"] = np.zeros((), dtype=np.int64)
    return tensors


def torch_modules(model: Sequential) -> list[str]:
    """The torch module that stands for each layer, e.g. ["Linear(64, 128)", "ReLU()", ...]."""
    modules = []
    for i, layer in enumerate(model.layers):
        _check_torch_layer(i, layer)
        modules.append(_torch_module(layer, model.shapes[i], model.shapes[i + 1]))
    return modules


def save_safetensors(model: Sequential, path: str | Path, layout: str = "dptrain", config: dict | None = None,
                     step: int = 0) -> Path:
    """Write the model's tensors in ``layout`` with the metadata the module docstring lists, atomically."""
    from safetensors.numpy import save

    from dptrain.storage.atomic import write_atomically

    tensors = model_tensors(model, layout)
    meta = {"format": "dptrain", "layout": layout, "version": __version__, "dtype": str(model.dtype),
            "in_shape": json.dumps(list(model.in_shape)), "out_shape": json.dumps(list(model.out_shape)),
            "step": str(step), "layers": json.dumps([layer.describe() for layer in model.layers]),
            "config": json.dumps(config or {}, sort_keys=True)}
    if layout == "torch":
        meta["torch_modules"] = json.dumps(torch_modules(model))
    return write_atomically(path, lambda fh: fh.write(save(tensors, metadata=meta)))


def load_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors in dptrain's names, the header's metadata) of a file; a torch-layout file written by
    dptrain is turned back (Dense weights transposed, ``num_batches_tracked`` dropped). UserError if
    it is not a safetensors file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError(f"{path}: reading a .safetensors file needs the safetensors package: "
                        f"pip install \"dptrain[export]\"") from None
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("layout", "dptrain") == "torch":
        layers = json.loads(meta.get("torch_modules", "[]"))
        converted = {}
        for name, array in tensors.items():
            index, _, key = name.partition(".")
            if key == "num_batches_tracked":
                continue
            is_linear = index.isdigit() and int(index) < len(layers) and layers[int(index)].startswith("Linear(")
            converted[f"layers.{index}.{key}"] = array.T if is_linear and key == "weight" else array
        tensors = converted
    return tensors, meta


def _check_torch_layer(i: int, layer) -> None:
    if not isinstance(layer, (Dense, Conv1D, Conv2D, BatchNorm, LayerNorm, Embedding, *_WITHOUT_PARAMETERS)):
        raise UserError(f"layers.{i} ({layer.describe()}): has no torch.nn.Sequential equivalent for --layout torch; "
                        f"export with --layout dptrain (or --format onnx)")


def _torch_module(layer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """The torch module of one layer, as its repr would read."""
    if isinstance(layer, Dense):
        return f"Linear({in_shape[-1]}, {out_shape[-1]}, bias={bool(layer.bias)})"
    if isinstance(layer, (Conv1D, Conv2D)):
        two = isinstance(layer, Conv2D)
        return (f"Conv{'2' if two else '1'}d({in_shape[0]}, {layer.filters}, kernel_size={layer.kernel}, "
                f"stride={layer.stride}, padding={layer.padding}, bias={bool(layer.bias)})")
    if isinstance(layer, BatchNorm):
        kind = "BatchNorm2d" if len(in_shape) == 3 else "BatchNorm1d"
        return f"{kind}({in_shape[0]}, eps={layer.eps}, momentum={layer.momentum})"
    if isinstance(layer, LayerNorm):
        shape = in_shape[-1:] if layer.over == "last" else in_shape
        return f"LayerNorm({list(shape)}, eps={layer.eps})"
    if isinstance(layer, Embedding):
        return f"Embedding({layer.params['weight'].shape[0]}, {layer.params['weight'].shape[1]})"
    if isinstance(layer, GlobalAvgPool):
        return "Sequential(AdaptiveAvgPool2d(1), Flatten())"
    if isinstance(layer, LeakyReLU):
        return f"LeakyReLU({layer.negative_slope:g})"
    if isinstance(layer, Dropout):
        return f"Dropout({layer.rate:g})"
    if isinstance(layer, (MaxPool1D, MaxPool2D, AvgPool1D, AvgPool2D)):
        name = type(layer).__name__.replace("2D", "2d").replace("1D", "1d")
        return f"{name}(kernel_size={layer.pool}, stride={layer.stride})"
    return f"{type(layer).__name__}()"  # ReLU, Tanh, Sigmoid, GELU, Flatten
