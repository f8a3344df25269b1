"""`model.freeze`: frozen parameters get no update and no weight decay; their gradients are 0, not
exchanged, and not computed below the first layer that trains; exact at any number of ranks.

The fine-tuning case of the issue: a model trained on the digits 0-4, fine-tuned on the digits 5-9
(a new output layer, `init_from_strict = false`) with its first layer frozen, ends with the same
weights at 1 and 2 ranks, its first layer bitwise that of the source."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dptrain import SGD, AdamW, Dense, ReLU, Sequential, SoftmaxCrossEntropy, Trainer
from dptrain.data import make_synthetic
from dptrain.parallel.exchange import plan_buckets

from helpers import assert_arrays_close, dptrain, invoke, load_arrays, needs_mpiexec


def _model(dtype=np.float64):
    model = Sequential([Dense(16), ReLU(), Dense(16), ReLU(), Dense(3)], in_shape=(8,), dtype=dtype)
    model.init_params(np.random.default_rng(0))
    return model


def test_prefixes_freeze_whole_layers_or_single_parameters_and_unknown_ones_are_refused():
    model = _model()
    assert model.freeze(["layers.0", "layers.2.bias"]) == ["layers.0.weight", "layers.0.bias", "layers.2.bias"]
    assert model.frozen == {"layers.0.weight", "layers.0.bias", "layers.2.bias"}
    with pytest.raises(ValueError, match="layers.7: no parameter of the model has this name or prefix"):
        _model().freeze(["layers.7"])
    with pytest.raises(ValueError, match="layers.0.w: no parameter"):
        _model().freeze(["layers.0.w"])  # a prefix is a path: layers.0.w does not match layers.0.weight


def test_frozen_gradients_are_zero_and_the_layers_below_the_first_trained_one_are_not_run_backward():
    model = _model()
    model.freeze(["layers.0", "layers.2.weight"])
    model.layer_seconds = np.zeros((len(model.layers), 2))
    x = np.random.default_rng(1).standard_normal((5, 8))
    model.forward(x)
    model.backward(np.ones((5, 3)), input_grad=False)
    grads = model.named_grads()
    assert not grads["layers.0.weight"].any() and not grads["layers.0.bias"].any()
    assert not grads["layers.2.weight"].any() and grads["layers.2.bias"].any() and grads["layers.4.weight"].any()
    assert model.layer_seconds[:2, 1].tolist() == [0.0, 0.0]  # Dense 0 and its ReLU: no backward at all
    assert model.layer_seconds[2, 1] > 0


def test_the_exchange_leaves_the_frozen_spans_out():
    model = _model()
    model.freeze(["layers.2"])
    frozen = [(s.offset, s.offset + s.size) for s in model.param_specs if s.name in model.frozen]
    for bucket_bytes in (0, 64, 1 << 20):
        buckets = plan_buckets(model, bucket_bytes)
        covered = sorted((b.start, b.stop) for b in buckets)
        assert all(not (lo < b_hi and b_lo < hi) for b_lo, b_hi in covered for lo, hi in frozen)
        assert sum(hi - lo for lo, hi in covered) == model.n_params - sum(hi - lo for lo, hi in frozen)


@pytest.mark.parametrize("make_optimizer", [
    lambda m: SGD(m.param_buffer, m.grad_buffer, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda m: AdamW(m.param_buffer, m.grad_buffer, lr=0.01, weight_decay=0.1),
], ids=["sgd-momentum-decay", "adamw"])
def test_frozen_parameters_do_not_move_and_the_others_do(make_optimizer):
    model = _model()
    model.freeze(["layers.0", "layers.4.bias"])
    before = {name: array.copy() for name, array in model.named_params().items()}
    data = make_synthetic(200, 8, 3, seed=0)
    Trainer(model, SoftmaxCrossEntropy(), make_optimizer(model), data, batch_size=20, epochs=2, log=None,
            clip_norm=1.0).fit()
    for name, array in model.named_params().items():
        if name in model.frozen:
            assert np.array_equal(array, before[name]), name
        else:
            assert not np.array_equal(array, before[name]), name


def _digits(folder, classes):
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    path = folder / f"digits_{classes[0]}_{classes[-1]}.npz"
    np.savez(path, x=digits.data[keep] / 16.0, y=digits.target[keep])
    return path


FINE_TUNE = ["--set", "data.name=npz", "--set", "train.dtype=float64", "--set", "model.hidden=[32, 32]",
             "--set", "train.epochs=4", "--quiet"]


@needs_mpiexec
def test_fine_tuning_new_classes_with_a_frozen_first_layer_is_the_same_at_1_and_2_ranks(tmp_path):
    source = tmp_path / "source"
    result = invoke("train", "--out", source, *FINE_TUNE, "--set", f"data.path={_digits(tmp_path, [0, 1, 2, 3, 4])}")
    assert result.exit_code == 0, result.output
    tune = [*FINE_TUNE, "--set", f"data.path={_digits(tmp_path, [5, 6, 7, 8, 9])}", "--init-from", str(source),
            "--set", "model.init_from_strict=false", "--set", 'model.freeze=["layers.0"]']
    finals = {}
    for ranks in (None, 2):
        out = tmp_path / f"tuned-{ranks}"
        result = dptrain("train", "--out", str(out), *tune, ranks=ranks)
        assert result.returncode == 0, result.stderr
        finals[ranks] = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    assert_arrays_close(finals[2], finals[None], rtol=1e-9)
    first = load_arrays(source / "checkpoints" / "latest" / "model.npz")
    for name in ("layers.0.weight", "layers.0.bias"):
        assert np.array_equal(finals[2][name], first[name]), name  # frozen: bitwise the source's
    assert finals[2]["layers.4.weight"].shape == (32, 10)  # the new output layer, trained
    assert not np.array_equal(finals[2]["layers.2.weight"], first["layers.2.weight"])
