"""The ``model.layers`` tables of the sequence layers: a good table makes the layer it says, a bad value is
refused with a UserError naming ``model.layers[i].key``."""

from __future__ import annotations

import pytest

from dptrain.config import load_config
from dptrain.config.layers import make_layer
from dptrain.errors import UserError
from dptrain.nn import AvgPool1D, Conv1D, Embedding, LayerNorm, MaxPool1D, PositionEmbedding


def test_good_tables_make_the_layers():
    conv = make_layer({"type": "conv1d", "filters": 8, "kernel": 5, "stride": 2, "padding": 2, "bias": False}, 0)
    assert isinstance(conv, Conv1D)
    assert conv.describe() == "Conv1D(8, kernel=5, stride=2, padding=2, bias=False)"
    pool = make_layer({"type": "maxpool1d", "pool": 3, "stride": 1}, 1)
    assert isinstance(pool, MaxPool1D) and (pool.pool, pool.stride) == (3, 1)
    avg = make_layer({"type": "avgpool1d", "pool": 2}, 2)
    assert isinstance(avg, AvgPool1D) and (avg.pool, avg.stride) == (2, 2)
    emb = make_layer({"type": "embedding", "dim": 16, "vocab": 74, "init_std": 0.05}, 3)
    assert isinstance(emb, Embedding) and (emb.dim, emb.vocab, emb.init_std) == (16, 74, 0.05)
    assert make_layer({"type": "embedding", "dim": 16}, 3).vocab is None  # set by the model builder
    pos = make_layer({"type": "position_embedding", "init_std": 1}, 4)
    assert isinstance(pos, PositionEmbedding) and pos.init_std == 1.0
    norm = make_layer({"type": "layernorm", "over": "last"}, 5)
    assert isinstance(norm, LayerNorm) and norm.over == "last"
    assert make_layer({"type": "layernorm"}, 5).over == "sample"


@pytest.mark.parametrize("table, words", [
    ({"type": "conv1d", "filters": 4, "kernel": [3, 3]}, ["model.layers[0].kernel", "an integer"]),
    ({"type": "conv1d", "filters": 4, "kernel": 3, "padding": 1.5}, ["model.layers[0].padding", "an integer"]),
    ({"type": "conv1d", "filters": 4, "kernel": 3, "stride": 0}, ["model.layers[0] (conv1d)", "stride must be >= 1"]),
    ({"type": "conv1d", "kernel": 3}, ["model.layers[0]", "needs 'filters'"]),
    ({"type": "maxpool1d", "pool": "2"}, ["model.layers[0].pool", "an integer"]),
    ({"type": "avgpool1d"}, ["model.layers[0]", "needs 'pool'"]),
    ({"type": "embedding", "dim": 16, "vocab": 2.0}, ["model.layers[0].vocab", "an integer"]),
    ({"type": "embedding", "dim": 16, "init_std": 0}, ["model.layers[0] (embedding)", "init_std must be"]),
    ({"type": "embedding", "dim": 16, "size": 3}, ["model.layers[0]", "unknown key 'size'"]),
    ({"type": "position_embedding", "init_std": "small"}, ["model.layers[0].init_std", "a number"]),
    ({"type": "layernorm", "over": "first"}, ["model.layers[0].over", "'sample', 'last'"]),
])
def test_bad_values_name_the_key(table, words):
    with pytest.raises(UserError) as info:
        make_layer(table, 0)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_a_config_file_refuses_a_bad_sequence_layer(tmp_path):
    path = tmp_path / "seq.toml"
    path.write_text('[model]\nlayers = [{type = "embedding", dim = 8}, {type = "conv1d", filters = 4, kernel = 2.5}]\n',
                    encoding="utf-8")
    with pytest.raises(UserError, match=r"model\.layers\[1\]\.kernel must be an integer, got 2\.5"):
        load_config(str(path))
