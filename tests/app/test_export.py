"""`dptrain export`: ONNX graphs that onnxruntime runs to `dptrain predict`'s probabilities, and
safetensors files in dptrain's layout (bitwise those of the checkpoint) or in torch's (the names and
shapes of the documented table), and back. (tests/app/test_onnx_export.py checks every layer.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptrain.app.export import load_safetensors

from helpers import invoke, load_arrays

safetensors_numpy = pytest.importorskip("safetensors.numpy")

QUICK = ["--set", "train.epochs=3", "--set", "optim.warmup_epochs=0", "--set", "train.steps=6", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config: run folder} of three short runs."""
    folders = {}
    for config in ("digits_mlp", "digits_cnn", "digits_resnet"):
        out = tmp_path_factory.mktemp(config) / "run"
        result = invoke("train", "--config", config, "--out", out, *QUICK)
        assert result.exit_code == 0, result.output
        folders[config] = out
    return folders


def _export(run, path, *extra):
    return invoke("export", "--checkpoint", run, "--format", "safetensors", "--output", path, *extra)


@pytest.mark.parametrize("config", ["digits_mlp", "digits_cnn", "digits_resnet"])
def test_onnxruntime_on_the_exported_graph_gives_dptrain_predicts_probabilities(runs, tmp_path, config):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    graph, rows, predictions = tmp_path / "model.onnx", tmp_path / "rows.npy", tmp_path / "p.csv"
    result = invoke("export", "--checkpoint", runs[config], "--format", "onnx", "--output", graph)
    assert result.exit_code == 0 and "as ONNX" in result.output, result.output
    x = np.random.default_rng(0).uniform(0, 16, (9, 64)).astype(np.float32)  # pixels as the digits have them
    np.save(rows, x)
    assert invoke("predict", "--checkpoint", runs[config], "--input", rows, "--output", predictions).exit_code == 0
    expected = np.loadtxt(predictions, delimiter=",", skiprows=1)[:, 2:]  # row, class, p_0..p_9
    session = onnxruntime.InferenceSession(str(graph))
    shape = [d if isinstance(d, int) else len(x) for d in session.get_inputs()[0].shape]
    [logits] = session.run(["y"], {"x": x.reshape(shape)})
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert np.abs(probabilities - expected).max() <= 1e-5


def test_a_layer_onnx_cannot_take_is_refused_by_name(tmp_path):
    pytest.importorskip("onnx")
    from dptrain import Layer, Sequential
    from dptrain.app.export.onnx_model import save_onnx
    from dptrain.errors import UserError

    class Square(Layer):
        def forward(self, x, train=True):
            return x * x

    with pytest.raises(UserError, match=r"layers\.0 \(Square\): cannot be exported to ONNX"):
        save_onnx(Sequential([Square()], in_shape=4), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_dptrain_layout_is_the_checkpoint_bit_for_bit_with_its_description(runs, tmp_path):
    path = tmp_path / "cnn.safetensors"
    result = _export(runs["digits_cnn"], path)
    assert result.exit_code == 0, result.output
    assert "written to" in result.output and "(dptrain layout)" in result.output
    tensors = safetensors_numpy.load_file(str(path))
    expected = load_arrays(runs["digits_cnn"] / "checkpoints" / "latest" / "model.npz")
    assert tensors.keys() == expected.keys()
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype and tensors[name].tobytes() == array.tobytes(), name
    _, meta = load_safetensors(path)
    assert meta["format"] == "dptrain" and meta["layout"] == "dptrain"
    assert json.loads(meta["in_shape"]) == [1, 8, 8] and json.loads(meta["out_shape"]) == [10]
    assert json.loads(meta["config"])["model"]["layers"]  # the run's resolved config
    assert int(meta["step"]) > 0 and json.loads(meta["layers"])[0].startswith("Conv2D(")


# The documented table, for the digits MLP (64-128-10) and CNN: torch names and shapes
TORCH_MLP = {"0.weight": (128, 64), "0.bias": (128,), "2.weight": (10, 128), "2.bias": (10,)}


def test_the_torch_layout_of_the_mlp_has_linears_names_and_shapes(runs, tmp_path):
    path = tmp_path / "mlp.safetensors"
    assert _export(runs["digits_mlp"], path, "--layout", "torch").exit_code == 0
    tensors = safetensors_numpy.load_file(str(path))
    assert {k: v.shape for k, v in tensors.items()} == TORCH_MLP
    model = load_arrays(runs["digits_mlp"] / "checkpoints" / "latest" / "model.npz")
    assert np.array_equal(tensors["0.weight"], model["layers.0.weight"].T)  # Linear: (out, in)
    _, meta = load_safetensors(path)
    assert json.loads(meta["torch_modules"]) == ["Linear(64, 128, bias=True)", "ReLU()", "Linear(128, 10, bias=True)"]


def test_the_torch_layout_of_the_cnn_follows_the_table(runs, tmp_path):
    path = tmp_path / "cnn.safetensors"
    assert _export(runs["digits_cnn"], path, "--layout", "torch").exit_code == 0
    tensors = safetensors_numpy.load_file(str(path))
    model = load_arrays(runs["digits_cnn"] / "checkpoints" / "latest" / "model.npz")
    _, meta = load_safetensors(path)
    modules = json.loads(meta["torch_modules"])
    for name, array in model.items():
        index, key = name.removeprefix("layers.").split(".", 1)
        torch_array = tensors[f"{index}.{key}"]
        if modules[int(index)].startswith("Linear("):
            assert np.array_equal(torch_array, array.T), name
        else:  # Conv2d (out, in, kh, kw) and BatchNorm's vectors: as they are
            assert np.array_equal(torch_array, array), name
    for i, module in enumerate(modules):
        if module.startswith("BatchNorm"):
            assert tensors[f"{i}.num_batches_tracked"].shape == () and tensors[f"{i}.num_batches_tracked"] == 0
    assert any(m.startswith("Conv2d(1, ") for m in modules)


def test_the_torch_layout_round_trips_to_dptrains(runs, tmp_path):
    path = tmp_path / "cnn.safetensors"
    assert _export(runs["digits_cnn"], path, "--layout", "torch").exit_code == 0
    back, _ = load_safetensors(path)
    model = load_arrays(runs["digits_cnn"] / "checkpoints" / "latest" / "model.npz")
    assert back.keys() == model.keys()
    for name, array in model.items():
        assert np.array_equal(back[name], array), name


def test_a_residual_model_has_no_torch_layout_and_is_refused_naming_the_block(runs, tmp_path):
    path = tmp_path / "resnet.safetensors"
    result = _export(runs["digits_resnet"], path, "--layout", "torch")
    assert result.exit_code == 2
    assert "(Residual(" in result.output and "has no torch.nn.Sequential equivalent" in result.output
    assert not path.exists()


def test_an_existing_output_is_kept_without_overwrite(runs, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_text("keep me")
    result = _export(runs["digits_mlp"], path)
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output
    assert path.read_text() == "keep me"
    assert _export(runs["digits_mlp"], path, "--overwrite").exit_code == 0


def test_loading_into_torch_where_torch_is_installed(runs, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "cnn.safetensors"
    assert _export(runs["digits_cnn"], path, "--layout", "torch").exit_code == 0
    _, meta = load_safetensors(path)
    nn = torch.nn
    namespace = {name: getattr(nn, name) for name in dir(nn)}
    net = nn.Sequential(*(eval(m, namespace) for m in json.loads(meta["torch_modules"])))  # noqa: S307 - our own strings
    net.load_state_dict(safetensors_torch.load_file(str(path)))  # strict: every name and shape matches
