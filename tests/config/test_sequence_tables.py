"""The ``model.layers`` tables of the sequence layers (1-D convolutions and pools, embeddings, LayerNorm over
the last axis, attention, the GRU): a good table makes the layer it says, a bad value is
refused with a UserError naming ``model.layers[i].key``."""

from __future__ import annotations

import pytest

from dptrain.config import load_config
from dptrain.config.layers import make_layer
from dptrain.errors import UserError
from dptrain.nn import (
    GRU,
    AvgPool1D,
    Conv1D,
    Embedding,
    LayerNorm,
    MaxPool1D,
    MultiHeadSelfAttention,
    PositionEmbedding,
    Residual,
)


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


def test_good_attention_and_gru_tables_make_the_layers():
    attention = make_layer({"type": "attention", "heads": 4, "causal": True, "init": 0.02, "bias": False}, 0)
    assert isinstance(attention, MultiHeadSelfAttention)
    assert (attention.heads, attention.causal, attention.init, attention.bias) == (4, True, 0.02, False)
    assert attention.describe() == "MultiHeadSelfAttention(heads=4, causal, init=0.02, bias=False)"
    assert make_layer({"type": "attention", "heads": 2, "init": 1}, 0).init == 1.0  # an integer std is a number
    plain = make_layer({"type": "attention", "heads": 2}, 0)
    assert (plain.causal, plain.init, plain.bias) == (False, "xavier", True)
    assert make_layer({"type": "attention", "heads": 2, "init": "he"}, 0).init == "he"
    gru = make_layer({"type": "gru", "units": 16, "bidirectional": True, "output": "last"}, 1)
    assert isinstance(gru, GRU) and (gru.hidden, gru.bidirectional, gru.output) == (16, True, "last")
    assert gru.describe() == "GRU(16, bidirectional, output=last)"
    assert make_layer({"type": "gru", "units": 8}, 1).describe() == "GRU(8, output=sequence)"
    block = make_layer({"type": "residual", "layers": [{"type": "attention", "heads": 2, "causal": True}]}, 2)
    assert isinstance(block, Residual) and isinstance(block.body[0], MultiHeadSelfAttention)


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
    ({"type": "attention"}, ["model.layers[0]", "needs 'heads'"]),
    ({"type": "attention", "heads": "4"}, ["model.layers[0].heads", "an integer"]),
    ({"type": "attention", "heads": 0}, ["model.layers[0] (attention)", "heads must be an integer >= 1"]),
    ({"type": "attention", "heads": 2, "causal": 1}, ["model.layers[0].causal", "true or false"]),
    ({"type": "attention", "heads": 2, "init": "normal"}, ["model.layers[0].init", "'he', 'xavier' or a number"]),
    ({"type": "attention", "heads": 2, "init": True}, ["model.layers[0].init", "or a number"]),
    ({"type": "attention", "heads": 2, "init": -0.02}, ["model.layers[0] (attention)", "init must be"]),
    ({"type": "attention", "heads": 2, "dropout": 0.1}, ["model.layers[0]", "unknown key 'dropout'"]),
    ({"type": "gru"}, ["model.layers[0]", "needs 'units'"]),
    ({"type": "gru", "units": 2.5}, ["model.layers[0].units", "an integer"]),
    ({"type": "gru", "units": 0}, ["model.layers[0] (gru)", "hidden must be an integer >= 1"]),
    ({"type": "gru", "units": 4, "hidden": 4}, ["model.layers[0]", "unknown key 'hidden'"]),
    ({"type": "gru", "units": 4, "bidirectional": "yes"}, ["model.layers[0].bidirectional", "true or false"]),
    ({"type": "gru", "units": 4, "output": "all"}, ["model.layers[0].output", "'sequence', 'last'"]),
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


def test_a_config_file_refuses_a_bad_value_with_the_layers_index(tmp_path):
    path = tmp_path / "seq.toml"
    path.write_text('[model]\nlayers = [{type = "attention", heads = 2, causal = true}, '
                    '{type = "gru", units = 4, output = "first"}]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"model\.layers\[1\]\.output must be one of 'sequence', 'last', got 'first'"):
        load_config(str(path))
