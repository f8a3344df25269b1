"""The API examples in examples/ run as written, alone and under mpiexec, and give what they say."""

from __future__ import annotations

import sys

import pytest

from helpers import MPI_MARKS, MPIEXEC, REPO, assert_arrays_close, load_arrays, needs_mpiexec, run

EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py"))
RANKS = [None, pytest.param(2, marks=MPI_MARKS)]
pytestmark = pytest.mark.slow  # each runs an example script to the end


def run_example(name: str, cwd, ranks: int | None):
    return run_example_with([name], cwd, ranks)


def run_example_with(args: list[str], cwd, ranks: int | None = None):
    argv = [sys.executable, str(REPO / "examples" / args[0]), *args[1:]]
    if ranks:
        argv = [MPIEXEC, "-n", str(ranks), *argv]
    result = run(argv, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_every_example_is_tested():
    assert EXAMPLES == ["custom_callback.py", "custom_layer.py", "digits_to_images.py", "train_cnn.py", "train_gpt.py",
                        "train_mlp.py"]


def test_digits_to_images_writes_the_folders_the_builtin_config_reads(tmp_path):
    lines = run_example_with(["digits_to_images.py", "digits_images"], tmp_path)
    assert lines == ["wrote 1438 training and 359 validation images (16x16) to digits_images"]
    train, val = (sorted((tmp_path / "digits_images" / part).rglob("*.png")) for part in ("train", "val"))
    assert len(train) == 1438 and len(val) == 359 and not {p.name for p in train} & {p.name for p in val}
    assert sorted(p.name for p in (tmp_path / "digits_images" / "train").iterdir()) == [str(d) for d in range(10)]
    result = run([sys.executable, "-m", "dptrain", "train", "--config", "digits_images", "--out", "run", "--quiet",
                  "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0"], cwd=tmp_path)
    assert result.returncode == 0 and "val_accuracy" in result.stdout, result.stderr


def check_train_mlp(lines, folder) -> None:
    assert float(lines[-1].split("val_accuracy")[1]) > 0.95
    assert (folder / "runs" / "api" / "checkpoints" / "latest" / "model.npz").is_file()


def test_train_mlp(tmp_path):
    check_train_mlp(run_example("train_mlp.py", tmp_path, None), tmp_path)


@pytest.mark.parametrize("ranks", RANKS)
def test_train_cnn(tmp_path, ranks):
    lines = run_example("train_cnn.py", tmp_path, ranks)
    assert lines[-1].endswith(tuple(f"val_accuracy {a / 10000:.4f}" for a in range(9500, 10001)))
    assert (tmp_path / "runs" / "api-cnn" / "checkpoints" / "latest" / "model.npz").is_file()


@pytest.mark.parametrize("ranks", RANKS)
def test_custom_callback(tmp_path, ranks):
    lines = run_example("custom_callback.py", tmp_path, ranks)
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(1, 6)]  # rank 0 alone prints
    for line in lines:
        assert all(f"{phase} " in line for phase in ("forward", "backward", "exchange", "optimizer"))


@needs_mpiexec
def test_train_mlp_at_two_ranks_gives_the_same_weights(tmp_path):
    """It runs under mpiexec, and ends with the single process's weights: float32, so equal up to rounding
    (the sums over a global batch are added in another order)."""
    for folder, ranks in (("one", None), ("two", 2)):
        (tmp_path / folder).mkdir()
        check_train_mlp(run_example("train_mlp.py", tmp_path / folder, ranks), tmp_path / folder)
    one, two = (load_arrays(tmp_path / d / "runs" / "api" / "checkpoints" / "latest" / "model.npz") for d in ("one", "two"))
    assert_arrays_close(two, one, rtol=1e-4)


@pytest.mark.parametrize("ranks", RANKS)
def test_custom_layer_in_a_residual_block(tmp_path, ranks):
    """The example's own layer learns (its scale leaves 0.1) and the ResNet around it trains."""
    [line] = run_example("custom_layer.py", tmp_path, ranks)
    gamma, accuracy = line.split(";")
    assert float(gamma.split()[-1]) > 0.2 and float(accuracy.split()[-1]) > 0.95


@pytest.mark.parametrize("ranks", RANKS)
def test_train_gpt_learns_its_verse_and_writes_in_it(tmp_path, ranks):
    lines = run_example("train_gpt.py", tmp_path, ranks)
    first, last = (float(v) for v in lines[0].removeprefix("val_loss ").split(" -> "))
    assert last < first / 2
    verse = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    text = "\n".join(lines[1:])
    assert text and set(text) <= set(verse)
    assert (tmp_path / "runs" / "api-gpt" / "checkpoints" / "latest" / "model.npz").is_file()
