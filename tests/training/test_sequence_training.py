"""The built-in GPT and GRU configs through the trainer: the same float64 weights at 1, 2 and 3 ranks as
in one process (a run measured in steps that crosses an epoch with a partial last batch), and the GPT's
text data end to end."""

from __future__ import annotations

import pytest

from helpers import assert_arrays_close, dptrain, invoke, load_arrays, needs_mpiexec

# a small text: 240 characters, the first 216 train -> 200 windows of 16; batch 48 -> 5 steps per epoch,
# the last one of 8 windows; 6 steps cross into the second epoch
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 3
GPT = ["train.dtype=float64", "train.steps=6", "train.batch_size=48", "data.block_size=16", "eval.every_steps=4",
       "eval.batches=0", "checkpoint.every_steps=0", "log.every_steps=0"]
# mnist1d-shaped synthetic sequences (40 steps of 1 value): 192 training samples, batch 50 -> a last batch of 42
GRU = ["train.dtype=float64", "train.epochs=2", "train.batch_size=50", "data.name=synthetic", "data.n_samples=240",
       "data.n_features=40", "data.n_classes=10", "checkpoint.every_epochs=0", "log.every_steps=0"]
CASES = {"shakespeare_char": GPT, "mnist1d_gru": GRU}


def _args(config: str, text_path) -> list[str]:
    sets = [*CASES[config], *([f"data.path={text_path}"] if config == "shakespeare_char" else [])]
    return ["train", "--config", config, *(a for s in sets for a in ("--set", s))]


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_path):
    weights = {}
    for config in CASES:
        out = tmp_path_factory.mktemp(config) / "run"
        result = invoke(*_args(config, text_path), "--out", str(out), "--comm", "single")  # in this process: fast
        assert result.exit_code == 0, result.output
        weights[config] = load_arrays(out / "checkpoints" / "latest" / "model.npz")
    return weights


@needs_mpiexec
@pytest.mark.parametrize("config", list(CASES))
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_gpt_and_gru_end_with_the_same_weights_at_any_world_size(config, ranks, single, text_path, tmp_path):
    result = dptrain(*_args(config, text_path), "--out", str(tmp_path / "run"), ranks=ranks)
    assert result.returncode == 0, result.stderr
    model = load_arrays(tmp_path / "run" / "checkpoints" / "latest" / "model.npz")
    assert model.keys() == single[config].keys()
    assert_arrays_close(model, single[config], rtol=1e-9)


def test_the_gpt_names_its_parameters_by_path(single):
    model = single["shakespeare_char"]
    assert model["layers.0.weight"].shape == (len(set(TEXT)), 128)  # the embedding: one row per character
    assert model["layers.2.body.1.qkv_weight"].shape == (128, 384)
    assert model["layers.11.weight"].shape == (128, len(set(TEXT)))  # the output layer, over the last axis
    assert single["mnist1d_gru"]["layers.0.weight_ih_reverse"].shape == (18, 1)
