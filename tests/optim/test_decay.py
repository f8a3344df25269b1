"""Weight decay on the weight matrices only (optim.decay = "matrices"): which parameters, the same
update as two optimizers over the parts, ZeRO slices, the config."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain import SGD, Adam, AdamW, RMSprop
from dptrain.app.build import build_model, build_optimizer
from dptrain.config import load_config, replace
from dptrain.config.validation import validate
from dptrain.errors import UserError
from dptrain.nn import (
    BatchNorm,
    Conv2D,
    Dense,
    Embedding,
    Flatten,
    LayerNorm,
    PositionEmbedding,
    ReLU,
    Residual,
    Sequential,
)

RANGES = [(2, 7), (11, 15)]


def _buffers(rng, n=20):
    return rng.standard_normal(n), rng.standard_normal(n)


@pytest.mark.parametrize("cls, kwargs", [
    (AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    (RMSprop, {"lr": 0.01, "weight_decay": 0.05}),
])
def test_decay_on_some_ranges_is_decay_there_and_none_elsewhere(cls, kwargs):
    rng = np.random.default_rng(0)
    params, grads = _buffers(rng)
    decayed, plain = params.copy(), params.copy()
    masked = cls(params, grads, **kwargs)
    masked.decay_only(RANGES)
    with_decay = cls(decayed, grads, **kwargs)
    without = cls(plain, grads, **{**kwargs, "weight_decay": 0.0})
    for _ in range(3):
        masked.step(0.5)
        with_decay.step(0.5)
        without.step(0.5)
    inside = np.zeros(len(params), dtype=bool)
    for a, b in RANGES:
        inside[a:b] = True
    np.testing.assert_array_equal(params[inside], decayed[inside])
    np.testing.assert_array_equal(params[~inside], plain[~inside])
    assert not np.array_equal(decayed, plain)


def test_a_slice_for_zero_keeps_the_decay_of_its_part():
    rng = np.random.default_rng(1)
    params, grads = _buffers(rng)
    whole_params = params.copy()
    whole = AdamW(whole_params, grads, lr=0.01, weight_decay=0.1)
    whole.decay_only(RANGES)
    parts = [whole.with_buffers(params[lo:hi], grads[lo:hi], start=lo) for lo, hi in ((0, 5), (5, 12), (12, 20))]
    whole.step()
    for part in parts:
        part.step()
    np.testing.assert_array_equal(params, whole_params)


def test_decay_ranges_are_weight_matrices_and_kernels_only():
    model = Sequential([Embedding(4, vocab=5), PositionEmbedding(), LayerNorm(over="last"), Dense(6),
                        Residual([Dense(6), ReLU(), Dense(6, bias=False)])], (3,), dtype=np.float64)
    decayed = {s.name for s in model.param_specs if (s.offset, s.offset + s.size) in model.decay_ranges()}
    assert decayed == {"layers.3.weight", "layers.4.body.0.weight", "layers.4.body.2.weight"}
    images = Sequential([Conv2D(2, 3, padding=1), BatchNorm(), LayerNorm(), Flatten(), Dense(3)], (1, 4, 4),
                        dtype=np.float64)
    decayed = {s.name for s in images.param_specs if (s.offset, s.offset + s.size) in images.decay_ranges()}
    assert decayed == {"layers.0.weight", "layers.4.weight"}  # not the (C, H, W) scale of the LayerNorm


def test_the_config_key_and_its_error():
    config = replace(load_config(None), optim={"name": "adamw", "weight_decay": 0.1, "decay": "matrices"})
    model = build_model(config, 64, 10)
    optimizer = build_optimizer(config, model)
    assert optimizer.decay_ranges == tuple(model.decay_ranges()) and len(optimizer.decay_ranges) == 2
    assert build_optimizer(replace(config, optim={"decay": "all"}), model).decay_ranges is None
    with pytest.raises(UserError, match="optim.decay is 'weights'"):
        validate(replace(config, optim={"decay": "weights"}))
