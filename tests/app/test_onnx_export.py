"""The ONNX export: onnxruntime's output matches ``model.forward(x, train=False)`` for the built-in configs
and for a small model of each supported layer; other layers are refused by path; the saved file has the
input "x", the output "y" and a dynamic batch dimension."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dptrain.app.build import build_model  # noqa: E402
from dptrain.app.export.onnx_model import OPSET, model_to_onnx, save_onnx  # noqa: E402
from dptrain.config import load_config  # noqa: E402
from dptrain.errors import UserError  # noqa: E402
from dptrain.nn import (  # noqa: E402
    GELU,
    GRU,
    AvgPool1D,
    AvgPool2D,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    Conv1D,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    Layer,
    LayerNorm,
    LeakyReLU,
    MaxPool1D,
    MaxPool2D,
    MultiHeadSelfAttention,
    PositionEmbedding,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Tanh,
)

BATCH = 7
TOLERANCE = 1e-5  # absolute, for outputs of size ~1; scaled by the largest output beyond


def session(onnx_model) -> ort.InferenceSession:
    """An onnxruntime CPU session of an in-memory model (checked first)."""
    onnx.checker.check_model(onnx_model)
    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def randomize_state(model: Sequential, rng: np.random.Generator) -> None:
    """Non-trivial values where initialisation leaves constants, so a wrong conversion shows: running
    statistics of BatchNorm, and every 1-D parameter (biases, norm scales and shifts)."""
    for name, buffer in model.named_buffers().items():
        if name.endswith("running_var"):
            buffer[...] = rng.uniform(0.5, 2.0, buffer.shape)
        else:
            buffer[...] = rng.normal(0.0, 0.5, buffer.shape)
    for name, param in model.named_params().items():
        if param.ndim == 1 and name.endswith("weight"):
            param[...] = rng.uniform(0.5, 1.5, param.shape)
        elif param.ndim == 1:
            param[...] = rng.normal(0.0, 0.3, param.shape)


def max_difference(model: Sequential, x: np.ndarray) -> tuple[float, float]:
    """(max |onnxruntime - forward(train=False)|, the tolerance for this output) on the float32 batch x."""
    expected = np.asarray(model.forward(x.astype(model.dtype), train=False), dtype=np.float64)
    (got,) = session(model_to_onnx(model)).run(None, {"x": x.astype(np.float32)})
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    return float(np.max(np.abs(got - expected))), TOLERANCE * max(1.0, float(np.max(np.abs(expected))))


def made(layers: list[Layer], in_shape, seed: int = 0, dtype=np.float32) -> Sequential:
    """A model of ``layers`` initialised from ``seed``, with randomized norms and biases."""
    model = Sequential(layers, in_shape, dtype=dtype)
    rng = np.random.default_rng(seed)
    model.init_params(rng)
    randomize_state(model, rng)
    return model


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_resnet"])
def test_builtin_configs_match(name):
    """A built-in config's model, as the product builds it (random weights and running statistics)."""
    model = build_model(load_config(name), 64, 10)  # digits: 64 pixels scaled to [0, 1], 10 classes
    rng = np.random.default_rng(1)
    randomize_state(model, rng)
    x = rng.uniform(0.0, 1.0, (BATCH, *model.in_shape))
    difference, tolerance = max_difference(model, x)
    assert difference <= tolerance, f"{name}: max abs difference {difference:.3g}"


def _ids(vocab: int):
    """An input maker of token ids in [0, vocab) as float32 whole numbers, as the data pipeline gives them."""
    return lambda rng, shape: rng.integers(0, vocab, shape).astype(np.float32)


#: (id, layers, one sample's shape, input maker or None for normal(0, 1) values)
CASES = [
    ("dense", [Dense(6)], (5,), None),
    ("dense_no_bias", [Dense(6, bias=False), Dense(3, init="xavier")], (5,), None),
    ("relu", [Dense(8), ReLU()], (5,), None),
    ("tanh", [Dense(8), Tanh()], (5,), None),
    ("sigmoid", [Dense(8), Sigmoid()], (5,), None),
    ("leaky_relu", [Dense(8), LeakyReLU(0.2)], (5,), None),
    ("gelu", [Dense(8), GELU()], (5,), None),
    ("dropout", [Dense(8), Dropout(0.5), Dense(3)], (5,), None),
    ("dropout_alone", [Dropout(0.5)], (5,), None),
    ("layernorm_flat", [Dense(8), LayerNorm(eps=1e-3)], (5,), None),
    ("layernorm_image", [LayerNorm()], (2, 4, 3), None),
    ("layernorm_last_on_images", [LayerNorm(over="last")], (2, 4, 3), None),
    ("batchnorm_flat", [Dense(6), BatchNorm(eps=1e-3)], (5,), None),
    ("batchnorm1d_flat", [BatchNorm1d()], (5,), None),
    ("batchnorm1d_sequences", [Conv1D(4, 3), BatchNorm1d()], (3, 9), None),
    ("batchnorm2d", [Conv2D(4, 3, padding=1), BatchNorm2d(eps=0.1)], (2, 6, 6), None),
    ("flatten", [Flatten(), Dense(4)], (2, 3, 4), None),
    ("conv2d", [Conv2D(5, 3)], (3, 9, 8), None),
    ("conv2d_stride_padding", [Conv2D(5, 3, stride=2, padding=1)], (3, 9, 8), None),
    ("conv2d_rectangular", [Conv2D(4, (3, 2), stride=(2, 1), padding=(0, 2), bias=False, init="xavier")], (2, 7, 5), None),
    ("maxpool2d", [MaxPool2D(2)], (3, 8, 8), None),
    ("maxpool2d_remainder", [MaxPool2D(2)], (3, 7, 9), None),
    ("maxpool2d_overlapping", [MaxPool2D(3, stride=2)], (3, 9, 8), None),
    ("maxpool2d_rectangular", [MaxPool2D((2, 3), stride=(1, 2))], (2, 6, 7), None),
    ("maxpool2d_after_padded_conv", [Conv2D(3, 3, padding=2), MaxPool2D(3, stride=2)], (2, 5, 5), None),
    ("avgpool2d", [AvgPool2D(2)], (3, 8, 8), None),
    ("avgpool2d_remainder", [AvgPool2D(3)], (3, 7, 8), None),
    ("avgpool2d_overlapping", [AvgPool2D(3, stride=1)], (2, 6, 5), None),
    ("avgpool2d_rectangular", [AvgPool2D((3, 2), stride=(2, 3))], (2, 7, 8), None),
    ("avgpool2d_after_padded_conv", [Conv2D(3, 3, padding=2), AvgPool2D(2, stride=3)], (2, 5, 5), None),
    ("global_avg_pool_images", [GlobalAvgPool()], (4, 5, 3), None),
    ("global_avg_pool_sequences", [GlobalAvgPool()], (4, 6), None),
    ("residual_identity", [Conv2D(4, 3, padding=1), Residual([Conv2D(4, 3, padding=1), BatchNorm(), ReLU()])],
     (2, 6, 6), None),
    ("residual_projection", [Residual([Conv2D(6, 3, stride=2, padding=1, bias=False), BatchNorm(), ReLU(),
                                       Conv2D(6, 3, padding=1)],
                                      shortcut=[Conv2D(6, 1, stride=2, bias=False), BatchNorm()]), ReLU()],
     (3, 8, 8), None),
    ("residual_nested", [Dense(6), Residual([Residual([Dense(6), Tanh()]), LayerNorm()], shortcut=[Dense(6)])],
     (4,), None),
    ("conv1d", [Conv1D(4, 3)], (3, 10), None),
    ("conv1d_stride_padding", [Conv1D(4, 4, stride=2, padding=2, bias=False)], (3, 11), None),
    ("maxpool1d", [MaxPool1D(3)], (2, 10), None),
    ("maxpool1d_stride", [MaxPool1D(3, stride=2)], (2, 10), None),
    ("avgpool1d", [AvgPool1D(2)], (2, 9), None),
    ("avgpool1d_stride", [AvgPool1D(4, stride=3)], (2, 11), None),
    ("embedding", [Embedding(6, vocab=11)], (5,), _ids(11)),
    ("position_embedding", [Embedding(6, vocab=11), PositionEmbedding()], (5,), _ids(11)),
    ("dense_on_sequences", [Dense(7), GELU(), Dense(3, bias=False)], (5, 4), None),
    ("layernorm_last", [LayerNorm(over="last")], (5, 4), None),
    ("attention", [MultiHeadSelfAttention(2)], (5, 6), None),
    ("attention_causal", [MultiHeadSelfAttention(3, causal=True)], (5, 6), None),
    ("attention_no_bias_one_head", [MultiHeadSelfAttention(1, bias=False, init=0.3)], (4, 6), None),
    ("gpt_block", [Embedding(8, vocab=13), PositionEmbedding(init_std=0.5),
                   Residual([LayerNorm(over="last"), MultiHeadSelfAttention(2, causal=True)]),
                   Residual([LayerNorm(over="last"), Dense(16), GELU(), Dense(8)]),
                   LayerNorm(over="last"), Dense(13)], (6,), _ids(13)),
    ("gru_sequence", [GRU(5)], (6, 3), None),
    ("gru_last", [GRU(5, output="last")], (6, 3), None),
    ("gru_bidirectional_sequence", [GRU(4, bidirectional=True)], (6, 3), None),
    ("gru_bidirectional_last", [GRU(4, bidirectional=True, output="last"), Dense(2)], (6, 3), None),
    ("mnist1d_like", [Conv1D(4, 5, padding=2), ReLU(), MaxPool1D(2), Conv1D(6, 3, stride=2), BatchNorm(), Tanh(),
                      AvgPool1D(2), GlobalAvgPool(), Dense(3)], (1, 24), None),
]


@pytest.mark.parametrize("layers, in_shape, make_input", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_layer_matches_forward(layers, in_shape, make_input):
    """A small model of each supported layer: onnxruntime gives forward(train=False) on a batch of BATCH."""
    model = made(layers, in_shape)
    rng = np.random.default_rng(2)
    shape = (BATCH, *model.in_shape)
    x = make_input(rng, shape) if make_input is not None else rng.normal(0.0, 1.0, shape)
    difference, tolerance = max_difference(model, x)
    assert difference <= tolerance, f"max abs difference {difference:.3g}"


def test_float64_model_exports_float32_weights():
    """Every parameter and buffer of a float64 model is a float32 initializer of the same name."""
    model = made([Conv2D(3, 3, padding=1), BatchNorm(), GELU(), Flatten(), Dense(4)], (2, 5, 5), dtype=np.float64)
    initializers = {t.name: t.data_type for t in model_to_onnx(model).graph.initializer}
    assert {initializers[name] for name in model.state_arrays()} == {onnx.TensorProto.FLOAT}
    difference, tolerance = max_difference(model, np.random.default_rng(3).normal(size=(BATCH, 2, 5, 5)))
    assert difference <= tolerance


class Square(Layer):
    """A user's own layer: y = x**2 (no ONNX conversion)."""

    def forward(self, x, train=True):
        return x * x


@pytest.mark.parametrize("layers, path", [
    ([Dense(4), Square()], "layers.1"),
    ([Dense(4), Residual([Dense(4), Square()])], "layers.1.body.1"),
    ([Residual([Dense(4)], shortcut=[Dense(4), Square()])], "layers.0.shortcut.1"),
])
def test_unsupported_layer_is_refused_by_path(layers, path, tmp_path):
    """A layer with no conversion, at the top or inside a block, gives a UserError naming its path."""
    model = made(layers, (3,))
    with pytest.raises(UserError) as caught:
        model_to_onnx(model)
    assert str(caught.value).startswith(f"{path} (Square): cannot be exported to ONNX: ")
    with pytest.raises(UserError):
        save_onnx(model, tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()


def test_saved_file_has_named_input_output_and_dynamic_batch(tmp_path):
    """save_onnx writes a file onnxruntime loads: input "x", output "y", any batch size."""
    model = made([Conv2D(4, 3, padding=1), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dense(3)], (1, 6, 6))
    path = tmp_path / "model.onnx"
    save_onnx(model, path)
    loaded = onnx.load(str(path))
    assert loaded.opset_import[0].version == OPSET
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("x", "y")
    assert inp.shape == ["batch", 1, 6, 6] and out.shape == ["batch", 3]
    assert inp.type == out.type == "tensor(float)"
    rng = np.random.default_rng(4)
    for batch in (1, 5):
        x = rng.normal(size=(batch, 1, 6, 6)).astype(np.float32)
        (y,) = sess.run(["y"], {"x": x})
        assert y.shape == (batch, 3)
        np.testing.assert_allclose(y, model.forward(x, train=False), atol=TOLERANCE, rtol=0)


def test_export_is_a_snapshot_of_the_weights():
    """Training after the export does not change the exported model: its weights are copies."""
    model = made([Dense(3)], (2,))
    onnx_model = model_to_onnx(model)
    x = np.ones((2, 2), dtype=np.float32)
    expected = model.forward(x, train=False).copy()
    model.param_buffer[...] += 1.0
    (y,) = session(onnx_model).run(None, {"x": x})
    np.testing.assert_allclose(y, expected, atol=TOLERANCE, rtol=0)
