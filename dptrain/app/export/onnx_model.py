"""A dptrain :class:`~dptrain.nn.model.Sequential` as an ONNX model, for inference elsewhere (onnxruntime and
the other ONNX runtimes).

The graph computes exactly what ``model.forward(x, train=False)`` computes (evaluation mode: Dropout is
the identity, BatchNorm uses its running statistics), in float32 whatever the model's dtype:

* opset :data:`OPSET` (17) of the default ONNX domain, IR version :data:`IR_VERSION` (8);
* one input ``"x"``, float32, of shape ``("batch", *model.in_shape)``, e.g. ("batch", 1, 8, 8) for images
  (NCHW, as dptrain's); token ids (an Embedding first) are whole numbers stored as float32, as the data
  pipeline gives them; flat rows are not reshaped for you, unlike ``model.forward``;
* one output ``"y"``, float32, of shape ``("batch", *model.out_shape)``: the last layer's output (logits,
  not probabilities: the loss's softmax or sigmoid is not part of the model);
* the batch dimension is symbolic ("batch"): any batch size runs, the other sizes are fixed;
* parameters are initializers named as ``model.named_params()`` names them (``layers.0.weight``,
  ``layers.3.body.0.weight``), buffers likewise (``layers.1.running_mean``), cast to float32;
  constants the conversion adds (shapes, masks, scales) are named after their layer's path too.

Which dptrain layer becomes which ONNX operators::

    Dense                    MatMul (+ Add): weight (in, out) as stored; flat (N, D) or sequences (N, T, D)
    ReLU / Tanh / Sigmoid    Relu / Tanh / Sigmoid
    LeakyReLU                LeakyRelu(alpha = negative_slope)
    GELU                     0.5 * x * (1 + Erf(x / sqrt(2))): Div, Erf, Add, Mul, Mul (the exact form)
    Dropout                  nothing (the identity in evaluation)
    Flatten                  Flatten(axis = 1)
    Conv2D                   Conv: weight (F, C, kh, kw) as stored, strides, pads (ph, pw, ph, pw)
    Conv1D                   Conv: weight (F, C, k) as stored, strides, pads (p, p)
    MaxPool2D / MaxPool1D    MaxPool: no padding, floor (windows past the end are dropped)
    AvgPool2D / AvgPool1D    AveragePool: no padding, floor
    GlobalAvgPool            GlobalAveragePool, Flatten(axis = 1): (N, C, *spatial) -> (N, C)
    BatchNorm (1d, 2d)       BatchNormalization(epsilon) with the running mean and variance
    LayerNorm                LayerNormalization(epsilon; axis = 1 for over="sample", -1 for over="last")
    Residual                 its body and shortcut (recursively), then Add
    Embedding                Cast (float ids -> int64), Gather(weight, axis = 0)
    PositionEmbedding        Add of the (T, D) table
    MultiHeadSelfAttention   MatMul (+ Add), Reshape, Transpose, Gather (q, k, v), Mul (1 / sqrt(dh)), MatMul,
                             Add of a -inf mask above the diagonal if causal, Softmax(axis = -1), MatMul,
                             Transpose, Reshape, MatMul (+ Add)
    GRU                      Transpose to (T, N, D), GRU(linear_before_reset = 1, forward or bidirectional;
                             gates reordered from r, z, n to ONNX's z, r, h), then Transpose and Reshape of Y
                             (output="sequence") or Y_h (output="last") to dptrain's (N, T, dirs*H) / (N, dirs*H)

Any other layer (a user's own class, say) is refused with a :class:`~dptrain.errors.UserError` that names
it by its path, e.g. ``layers.3.body.1 (Square): cannot be exported to ONNX: ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dptrain._version import __version__
from dptrain.errors import UserError
from dptrain.nn.attention import MultiHeadSelfAttention
from dptrain.nn.conv import Conv1D, Conv2D, Flatten
from dptrain.nn.dropout import Dropout
from dptrain.nn.embedding import Embedding, PositionEmbedding
from dptrain.nn.layers import GELU, Dense, Layer, LeakyReLU, ReLU, Sigmoid, Tanh
from dptrain.nn.model import Sequential
from dptrain.nn.norm import BatchNorm, BatchNorm1d, BatchNorm2d, LayerNorm
from dptrain.nn.pooling import AvgPool1D, AvgPool2D, GlobalAvgPool, MaxPool1D, MaxPool2D
from dptrain.nn.recurrent import GRU
from dptrain.nn.residual import Residual

#: the ONNX operator set of the default domain the graph uses (LayerNormalization needs 17)
OPSET = 17
#: the IR version written into the file: the one that came with opset 17 (onnx 1.12), so that older
#: runtimes load it too
IR_VERSION = 8
INPUT_NAME = "x"
OUTPUT_NAME = "y"
#: the symbolic name of the batch dimension of the input and the output
BATCH_DIM = "batch"


class _Unsupported(Exception):
    """A layer, or one of its settings, with no ONNX conversion; the reason, to be prefixed by its path."""


class _GraphBuilder:
    """The nodes and initializers of the graph being built, in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = {INPUT_NAME}

    def _fresh(self, name: str) -> str:
        """``name`` if no value has it yet, else ``name`` with the first free suffix "_1", "_2", ..."""
        fresh, k = name, 0
        while fresh in self._names:
            k += 1
            fresh = f"{name}_{k}"
        self._names.add(fresh)
        return fresh

    def constant(self, name: str, array, dtype=np.float32) -> str:
        """An initializer holding ``array`` cast to ``dtype`` (float32 parameters, int64 shapes); its name."""
        name = self._fresh(name)
        value = np.array(array, dtype=dtype, order="C")  # a copy; a 0-d array stays 0-d (a scalar)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def add(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        """A node ``op(*inputs)`` with one output named after ``output``; that output's name."""
        output = self._fresh(output)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def add_multi(self, op: str, inputs: list[str], outputs: list[str], **attributes) -> list[str]:
        """A node with several outputs ("" for an optional output left out); their names."""
        names = [self._fresh(o) if o else "" for o in outputs]
        self.nodes.append(helper.make_node(op, inputs, names, name=next(n for n in names if n), **attributes))
        return names

    def rename_output(self, old: str, new: str) -> None:
        """Give the value ``old`` (a node's output, used by no node) the name ``new``."""
        for node in self.nodes:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
                    self._names.add(new)
                    return
        raise AssertionError(f"no node makes {old}")


def _float32(array: np.ndarray) -> np.ndarray:
    """A parameter or buffer as a float32 copy (a float64 model exports float32 weights)."""
    return np.array(array, dtype=np.float32)


# -- elementwise layers -------------------------------------------------------------------------------


def _convert_simple(op: str) -> Callable:
    """The converter of an elementwise layer that is one ONNX operator without attributes."""

    def convert(g: _GraphBuilder, layer: Layer, x: str, in_shape: tuple[int, ...], path: str) -> str:
        """x : (N, *in_shape) -> op(x), same shape."""
        return g.add(op, [x], f"{path}.{op.lower()}")

    return convert


def _convert_leaky_relu(g: _GraphBuilder, layer: LeakyReLU, x: str, in_shape, path: str) -> str:
    """x : (N, *in_shape) -> LeakyRelu(x) with alpha = the layer's negative_slope, same shape."""
    return g.add("LeakyRelu", [x], f"{path}.leaky_relu", alpha=layer.negative_slope)


def _convert_gelu(g: _GraphBuilder, layer: GELU, x: str, in_shape, path: str) -> str:
    """x : (N, *in_shape) -> 0.5 * x * (1 + erf(x / sqrt(2))), same shape (opset 17 has no Gelu)."""
    scaled = g.add("Div", [x, g.constant(f"{path}.sqrt2", math.sqrt(2.0))], f"{path}.x_over_sqrt2")
    erf = g.add("Erf", [scaled], f"{path}.erf")
    one_plus = g.add("Add", [erf, g.constant(f"{path}.one", 1.0)], f"{path}.one_plus_erf")
    half_x = g.add("Mul", [x, g.constant(f"{path}.half", 0.5)], f"{path}.half_x")
    return g.add("Mul", [half_x, one_plus], f"{path}.gelu")


def _convert_dropout(g: _GraphBuilder, layer: Dropout, x: str, in_shape, path: str) -> str:
    """The identity (evaluation): no node, x itself."""
    return x


# -- dense, convolution, pooling, shape ---------------------------------------------------------------


def _convert_dense(g: _GraphBuilder, layer: Dense, x: str, in_shape, path: str) -> str:
    """x : (N, D) or (N, T, D) -> x @ weight (+ bias) : (N, out) or (N, T, out); weight (D, out) as stored."""
    y = g.add("MatMul", [x, g.constant(f"{path}.weight", _float32(layer.params["weight"]))], f"{path}.matmul")
    if layer.bias:
        y = g.add("Add", [y, g.constant(f"{path}.bias", _float32(layer.params["bias"]))], f"{path}.dense")
    return y


def _conv_inputs(g: _GraphBuilder, layer: Conv1D | Conv2D, path: str) -> list[str]:
    """The Conv node's weight (F, C, *kernel) and, if the layer has one, bias (F,) initializers."""
    inputs = [g.constant(f"{path}.weight", _float32(layer.params["weight"]))]
    if layer.bias:
        inputs.append(g.constant(f"{path}.bias", _float32(layer.params["bias"])))
    return inputs


def _convert_conv2d(g: _GraphBuilder, layer: Conv2D, x: str, in_shape, path: str) -> str:
    """x : (N, C, H, W) -> Conv : (N, F, Ho, Wo), zero padding (ph, pw) on both sides of each axis."""
    (ph, pw) = layer.padding
    return g.add("Conv", [x, *_conv_inputs(g, layer, path)], f"{path}.conv", kernel_shape=list(layer.kernel),
                 strides=list(layer.stride), pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)


def _convert_conv1d(g: _GraphBuilder, layer: Conv1D, x: str, in_shape, path: str) -> str:
    """x : (N, C, L) -> Conv : (N, F, Lo), zero padding on both ends."""
    return g.add("Conv", [x, *_conv_inputs(g, layer, path)], f"{path}.conv", kernel_shape=[layer.kernel],
                 strides=[layer.stride], pads=[layer.padding, layer.padding], dilations=[1], group=1)


def _convert_pool(op: str) -> Callable:
    """The converter of MaxPool2D / AvgPool2D (op "MaxPool" / "AveragePool")."""

    def convert(g: _GraphBuilder, layer: MaxPool2D | AvgPool2D, x: str, in_shape, path: str) -> str:
        """x : (N, C, H, W) -> (N, C, Ho, Wo), Ho = (H - ph) // sh + 1: no padding, no partial window."""
        extra = {"count_include_pad": 0} if op == "AveragePool" else {}
        return g.add(op, [x], f"{path}.pool", kernel_shape=list(layer.pool), strides=list(layer.stride),
                     pads=[0, 0, 0, 0], ceil_mode=0, **extra)

    return convert


def _convert_pool1d(op: str) -> Callable:
    """The converter of MaxPool1D / AvgPool1D (op "MaxPool" / "AveragePool")."""

    def convert(g: _GraphBuilder, layer: MaxPool1D | AvgPool1D, x: str, in_shape, path: str) -> str:
        """x : (N, C, L) -> (N, C, Lo), Lo = (L - pool) // stride + 1: no padding, no partial window."""
        extra = {"count_include_pad": 0} if op == "AveragePool" else {}
        return g.add(op, [x], f"{path}.pool", kernel_shape=[layer.pool], strides=[layer.stride], pads=[0, 0],
                     ceil_mode=0, **extra)

    return convert


def _convert_global_avg_pool(g: _GraphBuilder, layer: GlobalAvgPool, x: str, in_shape, path: str) -> str:
    """x : (N, C, *spatial) -> the mean over the spatial positions : (N, C)."""
    pooled = g.add("GlobalAveragePool", [x], f"{path}.pool")  # (N, C, 1, ...)
    return g.add("Flatten", [pooled], f"{path}.flatten", axis=1)


def _convert_flatten(g: _GraphBuilder, layer: Flatten, x: str, in_shape, path: str) -> str:
    """x : (N, *in_shape) -> (N, prod(in_shape)), C order as NumPy's reshape."""
    return g.add("Flatten", [x], f"{path}.flatten", axis=1)


# -- normalization --------------------------------------------------------------------------------------


def _convert_batchnorm(g: _GraphBuilder, layer: BatchNorm, x: str, in_shape, path: str) -> str:
    """x : (N, C) or (N, C, *spatial) -> (x - running_mean) / sqrt(running_var + eps) * weight + bias per
    channel, same shape."""
    inputs = [g.constant(f"{path}.{key}", _float32(layer.params[key])) for key in ("weight", "bias")]
    inputs += [g.constant(f"{path}.{key}", _float32(layer.buffers[key])) for key in ("running_mean", "running_var")]
    return g.add("BatchNormalization", [x, *inputs], f"{path}.batchnorm", epsilon=layer.eps)


def _convert_layernorm(g: _GraphBuilder, layer: LayerNorm, x: str, in_shape, path: str) -> str:
    """x : (N, *in_shape) -> normalized over each whole sample (axis 1 on: weight and bias of the sample's
    shape) or over the last axis (weight and bias (D,)), same shape."""
    axis = 1 if layer.over == "sample" else -1
    scale = g.constant(f"{path}.weight", _float32(layer.params["weight"]))
    bias = g.constant(f"{path}.bias", _float32(layer.params["bias"]))
    return g.add("LayerNormalization", [x, scale, bias], f"{path}.layernorm", axis=axis, epsilon=layer.eps)


# -- blocks -----------------------------------------------------------------------------------------


def _convert_residual(g: _GraphBuilder, layer: Residual, x: str, in_shape, path: str) -> str:
    """x : (N, *in_shape) -> body(x) + shortcut(x) (x itself without a shortcut), the body's output shape."""
    body = _convert_chain(g, layer.body, x, in_shape, f"{path}.body")
    skip = _convert_chain(g, layer.shortcut, x, in_shape, f"{path}.shortcut")
    return g.add("Add", [body, skip], f"{path}.add")


# -- sequences --------------------------------------------------------------------------------------


def _convert_embedding(g: _GraphBuilder, layer: Embedding, x: str, in_shape, path: str) -> str:
    """x : (N, T) token ids as float32 whole numbers -> weight[ids] : (N, T, dim)."""
    ids = g.add("Cast", [x], f"{path}.ids", to=TensorProto.INT64)
    return g.add("Gather", [g.constant(f"{path}.weight", _float32(layer.params["weight"])), ids], f"{path}.embedding",
                 axis=0)


def _convert_position_embedding(g: _GraphBuilder, layer: PositionEmbedding, x: str, in_shape, path: str) -> str:
    """x : (N, T, D) -> x + weight (T, D)."""
    return g.add("Add", [x, g.constant(f"{path}.weight", _float32(layer.params["weight"]))], f"{path}.add")


def _causal_mask(t: int) -> np.ndarray:
    """(T, T) float32 additive mask of the scores [query, key]: 0 where key <= query, -inf above the diagonal."""
    return np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1)


def _convert_attention(g: _GraphBuilder, layer: MultiHeadSelfAttention, x: str, in_shape, path: str) -> str:
    """x : (N, T, D) -> self-attention with H heads of dh = D / H features : (N, T, D).

    qkv (N, T, 3D) -> (N, T, 3, H, dh) -> (3, N, H, T, dh); q, k, v (N, H, T, dh); scores q k^T / sqrt(dh)
    (N, H, T, T) (+ the causal mask); softmax over the keys; (N, H, T, dh) -> (N, T, H, dh) -> (N, T, D).
    """
    t, d = in_shape
    h = layer.heads
    dh = d // h
    p = layer.params
    qkv = g.add("MatMul", [x, g.constant(f"{path}.qkv_weight", _float32(p["qkv_weight"]))], f"{path}.qkv_matmul")
    if layer.bias:
        qkv = g.add("Add", [qkv, g.constant(f"{path}.qkv_bias", _float32(p["qkv_bias"]))], f"{path}.qkv")
    split = g.add("Reshape", [qkv, g.constant(f"{path}.qkv_shape", [0, t, 3, h, dh], np.int64)], f"{path}.qkv_heads")
    heads = g.add("Transpose", [split], f"{path}.heads", perm=[2, 0, 3, 1, 4])  # (3, N, H, T, dh)
    q, k, v = (g.add("Gather", [heads, g.constant(f"{path}.index_{name}", i, np.int64)], f"{path}.{name}", axis=0)
               for i, name in enumerate("qkv"))
    q = g.add("Mul", [q, g.constant(f"{path}.scale", 1.0 / math.sqrt(dh))], f"{path}.q_scaled")
    k_t = g.add("Transpose", [k], f"{path}.k_t", perm=[0, 1, 3, 2])  # (N, H, dh, T)
    scores = g.add("MatMul", [q, k_t], f"{path}.scores")  # (N, H, T_query, T_key)
    if layer.causal:
        scores = g.add("Add", [scores, g.constant(f"{path}.causal_mask", _causal_mask(t))], f"{path}.masked_scores")
    weights = g.add("Softmax", [scores], f"{path}.weights", axis=-1)
    o = g.add("MatMul", [weights, v], f"{path}.o")  # (N, H, T, dh)
    o = g.add("Transpose", [o], f"{path}.o_t", perm=[0, 2, 1, 3])  # (N, T, H, dh)
    o = g.add("Reshape", [o, g.constant(f"{path}.o_shape", [0, t, d], np.int64)], f"{path}.o_rows")
    y = g.add("MatMul", [o, g.constant(f"{path}.proj_weight", _float32(p["proj_weight"]))], f"{path}.proj_matmul")
    if layer.bias:
        y = g.add("Add", [y, g.constant(f"{path}.proj_bias", _float32(p["proj_bias"]))], f"{path}.proj")
    return y


def _gates_zrn(rows: np.ndarray, hidden: int) -> np.ndarray:
    """torch's gate blocks r, z, n (3H, ...) reordered to ONNX's z, r, h (3H, ...), float32."""
    r, z, n = rows[:hidden], rows[hidden:2 * hidden], rows[2 * hidden:]
    return _float32(np.concatenate([z, r, n]))


def _convert_gru(g: _GraphBuilder, layer: GRU, x: str, in_shape, path: str) -> str:
    """x : (N, T, D) -> (N, T, dirs * H) (output="sequence") or (N, dirs * H) (output="last").

    ONNX's GRU with linear_before_reset=1 is torch's (and dptrain's) cell: n = tanh(x W_n^T + b_in +
    r * (h R_n^T + b_hn)). W (dirs, 3H, D), R (dirs, 3H, H), B (dirs, 6H) = [W biases | R biases], gates z, r, h.
    """
    t, _ = in_shape
    hidden, p = layer.hidden, layer.params
    suffixes = ("", "_reverse") if layer.bidirectional else ("",)
    dirs = len(suffixes)
    w = np.stack([_gates_zrn(p["weight_ih" + s], hidden) for s in suffixes])
    r = np.stack([_gates_zrn(p["weight_hh" + s], hidden) for s in suffixes])
    b = np.stack([np.concatenate([_gates_zrn(p["bias_ih" + s], hidden), _gates_zrn(p["bias_hh" + s], hidden)])
                  for s in suffixes])
    time_major = g.add("Transpose", [x], f"{path}.x_time_major", perm=[1, 0, 2])  # (T, N, D)
    sequence = layer.output == "sequence"
    inputs = [time_major, g.constant(f"{path}.W", w), g.constant(f"{path}.R", r), g.constant(f"{path}.B", b)]
    outputs = [f"{path}.Y", ""] if sequence else ["", f"{path}.Y_h"]
    all_states, last_state = g.add_multi(
        "GRU", inputs, outputs, hidden_size=hidden, linear_before_reset=1,
        direction="bidirectional" if layer.bidirectional else "forward")
    if sequence:  # Y (T, dirs, N, H) -> (N, T, dirs, H) -> (N, T, dirs * H), forward features first
        batch_major = g.add("Transpose", [all_states], f"{path}.Y_batch_major", perm=[2, 0, 1, 3])
        shape = g.constant(f"{path}.y_shape", [0, t, dirs * hidden], np.int64)
    else:  # Y_h (dirs, N, H) -> (N, dirs, H) -> (N, dirs * H)
        batch_major = g.add("Transpose", [last_state], f"{path}.Y_h_batch_major", perm=[1, 0, 2])
        shape = g.constant(f"{path}.y_shape", [0, dirs * hidden], np.int64)
    return g.add("Reshape", [batch_major, shape], f"{path}.gru")


# -- the table and the walk ---------------------------------------------------------------------------

#: the exact layer class -> its converter (graph, layer, input name, one input sample's shape, path) ->
#: output name. Exact classes, not subclasses: a subclass may compute something else.
CONVERTERS: dict[type, Callable] = {
    Dense: _convert_dense,
    ReLU: _convert_simple("Relu"),
    Tanh: _convert_simple("Tanh"),
    Sigmoid: _convert_simple("Sigmoid"),
    LeakyReLU: _convert_leaky_relu,
    GELU: _convert_gelu,
    Dropout: _convert_dropout,
    Flatten: _convert_flatten,
    Conv2D: _convert_conv2d,
    Conv1D: _convert_conv1d,
    MaxPool2D: _convert_pool("MaxPool"),
    AvgPool2D: _convert_pool("AveragePool"),
    MaxPool1D: _convert_pool1d("MaxPool"),
    AvgPool1D: _convert_pool1d("AveragePool"),
    GlobalAvgPool: _convert_global_avg_pool,
    BatchNorm: _convert_batchnorm,
    BatchNorm1d: _convert_batchnorm,
    BatchNorm2d: _convert_batchnorm,
    LayerNorm: _convert_layernorm,
    Residual: _convert_residual,
    Embedding: _convert_embedding,
    PositionEmbedding: _convert_position_embedding,
    MultiHeadSelfAttention: _convert_attention,
    GRU: _convert_gru,
}


def _convert_layer(g: _GraphBuilder, layer: Layer, x: str, in_shape: tuple[int, ...], path: str) -> str:
    """One layer's nodes from the value ``x`` (N, *in_shape); its output's name. UserError naming ``path`` if
    the layer cannot be exported."""
    converter = CONVERTERS.get(type(layer))
    try:
        if converter is None:
            supported = ", ".join(sorted(cls.__name__ for cls in CONVERTERS))
            raise _Unsupported(f"no ONNX conversion for {type(layer).__name__} layers (supported: {supported})")
        return converter(g, layer, x, in_shape, path)
    except _Unsupported as exc:
        raise UserError(f"{path} ({layer.describe()}): cannot be exported to ONNX: {exc}") from None


def _convert_chain(g: _GraphBuilder, layers: list[Layer], x: str, in_shape: tuple[int, ...], prefix: str) -> str:
    """The layers applied in order from the value ``x`` (N, *in_shape), the i-th at path ``{prefix}.{i}``;
    the last output's name (``x`` itself for no layer)."""
    shape = tuple(in_shape)
    for i, layer in enumerate(layers):
        x = _convert_layer(g, layer, x, shape, f"{prefix}.{i}")
        shape = tuple(int(s) for s in layer.output_shape(shape))
    return x


def _value_info(name: str, sample_shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    """A float32 graph input or output of shape ("batch", *sample_shape)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, *sample_shape])


def model_to_onnx(model: Sequential) -> onnx.ModelProto:
    """The ONNX model of ``model`` in evaluation mode: input "x" ("batch", *model.in_shape) float32, output "y"
    ("batch", *model.out_shape) float32, opset :data:`OPSET`; the weights are copied (float32), so later
    training does not change it. UserError naming the first layer that cannot be exported."""
    g = _GraphBuilder()
    y = _convert_chain(g, model.layers, INPUT_NAME, model.in_shape, "layers")
    if y == INPUT_NAME:  # no layer computed anything (only Dropout, say): y is a copy of x
        g.add("Identity", [y], OUTPUT_NAME)
    else:
        g.rename_output(y, OUTPUT_NAME)
    graph = helper.make_graph(g.nodes, "dptrain_model", [_value_info(INPUT_NAME, model.in_shape)],
                              [_value_info(OUTPUT_NAME, model.out_shape)], initializer=g.initializers,
                              doc_string=" -> ".join(layer.describe() for layer in model.layers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="dptrain", producer_version=__version__)


def save_onnx(model: Sequential, path) -> None:
    """Write ``model`` (see :func:`model_to_onnx`) to the file ``path``, after ``onnx.checker.check_model``."""
    onnx_model = model_to_onnx(model)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
