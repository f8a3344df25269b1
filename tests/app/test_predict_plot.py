"""`dptrain predict`, `dptrain eval --data` and `dptrain plot`, checked against the model's weights
applied by hand with NumPy, and under mpiexec against the single-process file."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits

from dptrain.app.predict import PREDICT_CHUNK, predict, row_range
from dptrain.cli import main

from helpers import dptrain, load_arrays, needs_mpiexec

QUICK = ["--set", "train.epochs=2", "--set", "model.hidden=[16]"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def mlp_logits(run: Path, x: np.ndarray) -> np.ndarray:
    """The logits of a Dense-ReLU-Dense checkpoint, applied by hand in its dtype (float32)."""
    w = load_arrays(run / "checkpoints" / "latest" / "model.npz")
    h = np.maximum(x.astype(np.float32) @ w["layers.0.weight"] + w["layers.0.bias"], 0)
    return h @ w["layers.2.weight"] + w["layers.2.bias"]


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def write_csv(path: Path, names: list[str], values: np.ndarray) -> Path:
    np.savetxt(path, values, delimiter=",", header=",".join(names), comments="", fmt="%.17g")
    return path


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    return bunch.data / 16.0, bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), *QUICK], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def target_run(tmp_path_factory) -> Path:
    """A digits run whose config names a label column, data.target = "label" (used by CSV files)."""
    out = tmp_path_factory.mktemp("digits-target") / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), *QUICK, "--set", "data.target=label"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def regression_run(tmp_path: Path, n_outputs: int, loss: str = "mse") -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(n_outputs)
    x = rng.standard_normal((300, 5))
    y = x @ rng.standard_normal((5, n_outputs))
    if loss == "bce_with_logits":
        y = (y > 0).astype(np.float64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    out = tmp_path / "run"
    result = invoke("train", "--out", out, "--set", "data.name=npz", "--set", f"data.path={tmp_path / 'data.npz'}",
                    "--set", f"train.loss={loss}", "--set", "train.epochs=3", "--set", "model.hidden=[8]")
    assert result.exit_code == 0, result.output
    return out, x


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_classification_from_npz_npy_and_csv(tmp_path, digits_run, digits):
    x, y = digits
    np.savez(tmp_path / "in.npz", x=x, y=y)  # y is ignored
    np.save(tmp_path / "in.npy", x)
    write_csv(tmp_path / "in.csv", [f"pixel{i}" for i in range(64)], x)
    for kind in ("npz", "npy", "csv"):
        result = invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / f"in.{kind}",
                        "--output", tmp_path / f"out-{kind}.csv")
        assert result.exit_code == 0, result.output
        assert "1797 predictions" in result.output
    text = (tmp_path / "out-npz.csv").read_text()
    assert (tmp_path / "out-npy.csv").read_text() == text
    assert (tmp_path / "out-csv.csv").read_text() == text

    names, table = read_csv(tmp_path / "out-npz.csv")
    assert names == ["row", "class", *(f"p_{j}" for j in range(10))]
    assert len(table) == 1797
    np.testing.assert_array_equal(table[:, 0], np.arange(1797))
    p = table[:, 2:]
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    logits = mlp_logits(digits_run, x)
    np.testing.assert_array_equal(table[:, 1], logits.argmax(axis=1))
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-8)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary left behind


def test_predict_csv_leaves_out_the_config_target_column(tmp_path, target_run, digits):
    x, y = digits
    np.save(tmp_path / "in.npy", x[:100])
    names = ["label", *(f"pixel{i}" for i in range(64))]  # the label first: dropped by name, not position
    write_csv(tmp_path / "in.csv", names, np.hstack([y[:100, None], x[:100]]))
    for kind in ("npy", "csv"):
        result = invoke("predict", "--checkpoint", target_run, "--input", tmp_path / f"in.{kind}",
                        "--output", tmp_path / f"out-{kind}.csv")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "out-csv.csv").read_text() == (tmp_path / "out-npy.csv").read_text()


@pytest.mark.parametrize("n_outputs, columns", [(1, ["row", "prediction"]), (2, ["row", "y_0", "y_1"])])
def test_predict_regression(tmp_path, n_outputs, columns):
    run, x = regression_run(tmp_path, n_outputs)
    result = invoke("predict", "--checkpoint", run, "--input", tmp_path / "data.npz", "--output", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    names, table = read_csv(tmp_path / "p.csv")
    assert names == columns
    w = load_arrays(run / "checkpoints" / "latest" / "model.npz")
    expected = np.maximum(x.astype(np.float32) @ w["layers.0.weight"] + w["layers.0.bias"], 0) @ w["layers.2.weight"]
    np.testing.assert_allclose(table[:, 1:], expected + w["layers.2.bias"], rtol=1e-6, atol=1e-6)


def test_predict_multilabel_gives_probabilities_and_labels(tmp_path):
    run, _ = regression_run(tmp_path, 3, loss="bce_with_logits")
    result = invoke("predict", "--checkpoint", run, "--input", tmp_path / "data.npz", "--output", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    names, table = read_csv(tmp_path / "p.csv")
    assert names == ["row", "p_0", "p_1", "p_2", "label_0", "label_1", "label_2"]
    p, labels = table[:, 1:4], table[:, 4:]
    assert np.all((p > 0) & (p < 1))
    np.testing.assert_array_equal(labels, (p > 0.5).astype(float))


def test_feature_count_mismatch_is_one_line_and_writes_nothing(tmp_path, digits_run, digits):
    x, y = digits
    np.save(tmp_path / "x63.npy", x[:, :63])
    line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / "x63.npy",
                                 "--output", tmp_path / "p.csv"))
    assert "x63.npy" in line and "63 feature columns" in line and "the model takes 64" in line
    # a label column in a CSV, with no data.target in the checkpoint's config to say so
    write_csv(tmp_path / "labelled.csv", [*(f"pixel{i}" for i in range(64)), "label"], np.hstack([x, y[:, None]]))
    line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / "labelled.csv",
                                 "--output", tmp_path / "p.csv"))
    assert "65 feature columns" in line and "'label'" in line and "data.target" in line
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("content, message", [
    ("a,b\n1,2\n3,x\n", "row 3, column 'b': 'x' is not a number"),
    ("a,b\n1,2\n3,\n", "row 3, column 'b': an empty cell"),
    ("a,b\n1,2\n3\n", "row 3 has 1 cell, but the header has 2 columns"),
    ("1,2\n3,4\n", "expected a header row"),
    ("a,b\n", "no data rows"),
])
def test_bad_csv_input_names_row_and_column(tmp_path, digits_run, content, message):
    (tmp_path / "in.csv").write_text(content)
    line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / "in.csv",
                                 "--output", tmp_path / "p.csv"))
    assert "in.csv" in line and message in line
    assert not (tmp_path / "p.csv").exists()


def test_bad_input_files(tmp_path, digits_run, digits):
    x, _ = digits
    np.savez(tmp_path / "no-x.npz", features=x)
    bad = x[:10].copy()
    bad[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "in.txt").write_text("1,2\n")
    for name, message in [("no-x.npz", "no array named 'x' (it holds 'features')"),
                          ("nan.npy", "row 7 (counting from 0) contains NaN or infinity"),
                          ("in.txt", "expected .npz (array x), .npy"),
                          ("missing.npz", "not found")]:
        line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / name,
                                     "--output", tmp_path / "p.csv"))
        assert name in line and message in line


def test_refuses_to_overwrite_without_overwrite(tmp_path, digits_run, digits):
    np.save(tmp_path / "in.npy", digits[0][:50])
    out = tmp_path / "p.csv"
    out.write_text("keep me\n")
    args = ["predict", "--checkpoint", digits_run, "--input", tmp_path / "in.npy", "--output", out]
    line = one_error_line(invoke(*args))
    assert "p.csv" in line and "exists" in line and "--overwrite" in line
    assert out.read_text() == "keep me\n"
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("row,class,p_0,")
    line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / "in.npy",
                                 "--output", tmp_path / "in.npy", "--overwrite"))
    assert "is the input file" in line


def test_rows_are_shared_in_whole_blocks_in_order():
    for n in (1, PREDICT_CHUNK - 1, 1797, 5 * PREDICT_CHUNK + 3):
        for size in (1, 2, 3, 8):
            ranges = [row_range(n, r, size) for r in range(size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(ranges))
            assert all(start % PREDICT_CHUNK == 0 for start, stop in ranges if start < stop)


@needs_mpiexec
def test_two_ranks_write_the_same_file(tmp_path, digits_run, digits):
    np.save(tmp_path / "in.npy", digits[0])  # 1797 rows: one block of 1024 for each rank
    single = dptrain("predict", "--checkpoint", str(digits_run), "--input", str(tmp_path / "in.npy"),
                     "--output", str(tmp_path / "p1.csv"))
    assert single.returncode == 0, single.stderr
    two = dptrain("predict", "--checkpoint", str(digits_run), "--input", str(tmp_path / "in.npy"),
                  "--output", str(tmp_path / "p2.csv"), ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("predictions") == 1  # rank 0 alone reports
    assert (tmp_path / "p2.csv").read_bytes() == (tmp_path / "p1.csv").read_bytes()
    bad = dptrain("predict", "--checkpoint", str(digits_run), "--input", str(tmp_path / "in.npy"),
                  "--output", str(tmp_path / "p2.csv"), ranks=2)
    assert bad.returncode == 2 and bad.stderr.count("exists") == 1


def test_python_api_predict(digits_run, digits):
    names, table = predict(digits_run, digits[0][:20])
    assert names[:3] == ["row", "class", "p_0"] and table.shape == (20, 12)
    np.testing.assert_array_equal(table[:, 1], mlp_logits(digits_run, digits[0][:20]).argmax(axis=1))


# ---------------------------------------------------------------------------------------------
# eval --data


def test_eval_data_matches_a_direct_computation(tmp_path, digits_run, digits):
    x, y = digits[0][1000:1400], digits[1][1000:1400]
    np.savez(tmp_path / "test.npz", x=x, y=y)
    result = invoke("eval", "--checkpoint", digits_run, "--data", tmp_path / "test.npz", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    logits = mlp_logits(digits_run, x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
    assert report["n_samples"] == 400 and report["data"] == str(tmp_path / "test.npz")
    assert report["loss"] == pytest.approx(losses.mean(), rel=1e-6)
    assert report["accuracy"] == np.mean(logits.argmax(axis=1) == y)
    # without --data: the validation split, as before
    report = json.loads(invoke("eval", "--checkpoint", digits_run, "--json").output)
    assert report["n_samples"] == 359 and "data" not in report


def test_eval_data_csv_uses_the_config_target(tmp_path, target_run, digits):
    x, y = digits[0][:300], digits[1][:300]
    np.savez(tmp_path / "test.npz", x=x, y=y)
    write_csv(tmp_path / "test.csv", [*(f"pixel{i}" for i in range(64)), "label"], np.hstack([x, y[:, None]]))
    reports = []
    for name in ("test.npz", "test.csv"):
        result = invoke("eval", "--checkpoint", target_run, "--data", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.output))
    for key in ("loss", "accuracy", "n_samples"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-12)


def test_eval_data_errors(tmp_path, digits_run, digits):
    x, y = digits
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "narrow.npz", x=x[:, :60], y=y)
    np.savez(tmp_path / "labels.npz", x=x[:5], y=np.array([0, 1, 2, 3, 10]))
    write_csv(tmp_path / "t.csv", ["a", "label"], np.ones((3, 2)))
    for name, message in [("x.npy", "is one .npy array, not an .npz with x and y"),
                          ("narrow.npz", "60 features per row, but the model takes 64"),
                          ("labels.npz", "labels must lie in [0, 10)"), ("t.csv", "no data.target"),
                          ("missing.npz", "not found")]:
        line = one_error_line(invoke("eval", "--checkpoint", digits_run, "--data", tmp_path / name))
        assert name in line and message in line


# ---------------------------------------------------------------------------------------------
# plot


def write_metrics(folder: Path, ranks: int, epochs: int = 6, steps_per_epoch: int = 23) -> Path:
    """A metrics.jsonl as a run writes it: a step row every 5 steps, an epoch row after each epoch."""
    rng = np.random.default_rng(ranks)
    folder.mkdir(parents=True)
    rows = []
    for epoch in range(1, epochs + 1):
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1):
            if step % 5 == 0:
                rows.append({"kind": "step", "step": step, "epoch": epoch,
                             "train_loss": 2.3 * np.exp(-step / 30) + 0.05 * rng.random(), "lr": 0.05,
                             "samples_per_s": 11_000.0 * ranks * (1 + 0.05 * rng.random()),
                             "data_ms": 0.4, "forward_ms": 8.5 / ranks, "backward_ms": 12.6 / ranks,
                             "exchange_ms": 1.3 if ranks > 1 else 0.0, "optimizer_ms": 0.9})
        step = epoch * steps_per_epoch
        rows.append({"kind": "epoch", "step": step, "epoch": epoch, "train_loss": 2.3 * np.exp(-step / 30),
                     "val_loss": 2.2 * np.exp(-step / 35) + 0.1, "val_accuracy": 0.98 - 0.7 * np.exp(-step / 30),
                     "lr": 0.05})
    rows.append({"kind": "epoch", "step": epochs * steps_per_epoch, "epoch": epochs})  # a row lacking most keys
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_plot_two_runs_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_metrics(tmp_path / "one-rank", 1), write_metrics(tmp_path / "two-ranks", 2)]
    with open(runs[1] / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "step", "step": 14')  # a row being written: skipped
    result = invoke("plot", *runs, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_the_timing_panel_stacks_data_first_and_draws_an_older_file_without_it(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from dptrain.app.plot import _timing_panel, read_metrics

    new, old = write_metrics(tmp_path / "new", 2), write_metrics(tmp_path / "old", 1)
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "data_ms"}) + "\n"
                                               for row in rows))  # as written before the data phase
    ax = Figure().add_subplot()
    _timing_panel(ax, [read_metrics(new), read_metrics(old)], {"new": "C0", "old": "C1"})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["data", "forward", "backward", "exchange", "optimizer"]
    data_bars = ax.containers[0]
    assert [round(bar.get_width(), 6) for bar in data_bars] == [0.4, 0.0]  # new run; old run: no data part
    assert [round(bar.get_x(), 6) for bar in ax.containers[1]] == [0.4, 0.0]  # forward starts after data


def test_plot_errors(tmp_path):
    pytest.importorskip("matplotlib")
    good = write_metrics(tmp_path / "good", 1)
    (tmp_path / "empty-run").mkdir()
    line = one_error_line(invoke("plot", good, tmp_path / "empty-run", "-o", tmp_path / "c.png"))
    assert "empty-run" in line and "no metrics.jsonl" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"kind": "epoch", "step": 1}\nnot json\n')
    line = one_error_line(invoke("plot", bad, "-o", tmp_path / "c.png"))
    assert "metrics.jsonl" in line and "line 2 is not JSON" in line
    line = one_error_line(invoke("plot", good, "-o", tmp_path / "c.nope"))
    assert "unknown image kind '.nope'" in line
    assert not (tmp_path / "c.png").exists()


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    run = write_metrics(tmp_path / "run", 1)
    line = one_error_line(invoke("plot", run, "-o", tmp_path / "c.png"))
    assert line == 'error: plot needs matplotlib: pip install "dptrain[plot]"'
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------------------------------------
# Input files read by the data loaders; the Python API checked as the command is


def test_renamed_npy_and_npz_are_one_line_errors(tmp_path, digits_run, digits):
    x, y = digits
    np.save(tmp_path / "array.npy", x[:20])
    (tmp_path / "array.npy").rename(tmp_path / "really-npy.npz")
    np.savez(tmp_path / "archive.npz", x=x[:20], y=y[:20])
    (tmp_path / "archive.npz").rename(tmp_path / "really-npz.npy")
    for name, message in [("really-npy.npz", "is one .npy array, not an .npz with x (give it the suffix .npy)"),
                          ("really-npz.npy", "is an .npz archive, not one .npy array")]:
        line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / name,
                                     "--output", tmp_path / "p.csv"))
        assert line == f"error: input file {tmp_path / name}: {message}"
    assert not (tmp_path / "p.csv").exists()


def test_uncompressed_npz_input_is_memory_mapped(tmp_path, digits):
    from dptrain.app.predict import read_features

    np.savez(tmp_path / "in.npz", x=digits[0][:30], y=digits[1][:30])
    x = read_features(tmp_path / "in.npz", 64, np.float32)
    assert isinstance(x, np.memmap) and x.shape == (30, 64)
    np.testing.assert_array_equal(x, digits[0][:30])


def test_non_utf8_csv_input_says_so(tmp_path, digits_run):
    (tmp_path / "in.csv").write_bytes("a,b\n\xe9,1\n".encode("latin-1"))
    line = one_error_line(invoke("predict", "--checkpoint", digits_run, "--input", tmp_path / "in.csv",
                                 "--output", tmp_path / "p.csv"))
    assert f"input file {tmp_path / 'in.csv'}: is not UTF-8 text" in line and "save it as UTF-8" in line


def test_python_api_checks_x_as_the_command_does(digits_run, digits):
    from dptrain.errors import UserError

    x = digits[0][:20].copy()
    with pytest.raises(UserError, match=r"63 feature columns, but the model takes 64 features per row"):
        predict(digits_run, x[:, :63])
    x[5, 2] = np.inf
    with pytest.raises(UserError, match=r"row 5 \(counting from 0\) contains NaN or infinity"):
        predict(digits_run, x)
    x[5, 2] = 1e300  # finite in float64, beyond float32 (the model's dtype)
    with pytest.raises(UserError, match=r"row 5 \(counting from 0\) holds a value beyond the range of float32"):
        predict(digits_run, x)
    with pytest.raises(UserError, match=r"no rows"):
        predict(digits_run, x[:0])


def test_eval_data_csv_class_label_beyond_the_outputs_names_the_row(tmp_path, target_run, digits):
    x, y = digits[0][:5], np.array([0, 1, 12, 3, 4])
    write_csv(tmp_path / "t.csv", [*(f"pixel{i}" for i in range(64)), "label"], np.hstack([x, y[:, None]]))
    line = one_error_line(invoke("eval", "--checkpoint", target_run, "--data", tmp_path / "t.csv"))
    assert line == (f"error: data file {tmp_path / 't.csv'}: row 4, column 'label': class label 12 is out of "
                    f"range: labels must lie in [0, 10)")


def test_predict_and_eval_do_not_need_the_optimizer_state(tmp_path, digits_run, digits):
    """optimizer.npz is neither hashed nor read to predict or evaluate (resuming still checks it)."""
    import shutil

    from dptrain.errors import UserError
    from dptrain.storage.checkpoint import load_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(digits_run / "checkpoints" / "latest", ckpt)
    (ckpt / "optimizer.npz").write_bytes(b"damaged")
    np.save(tmp_path / "in.npy", digits[0][:10])
    result = invoke("predict", "--checkpoint", ckpt, "--input", tmp_path / "in.npy", "--output", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    np.savez(tmp_path / "test.npz", x=digits[0][:10], y=digits[1][:10])
    result = invoke("eval", "--checkpoint", ckpt, "--data", tmp_path / "test.npz")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(ckpt, optimizer=False).optimizer == {}
    with pytest.raises(UserError, match="optimizer.npz: SHA-256 does not match"):
        load_checkpoint(ckpt)


def test_eval_debug_shows_the_traceback_of_a_setup_error(tmp_path):
    from dptrain.errors import UserError

    result = invoke("eval", "--checkpoint", tmp_path / "nope", "--debug")
    assert isinstance(result.exception, UserError) and "not found" in str(result.exception)
    assert result.exit_code != 2 and "error: " not in result.output  # raised, not reported in one line
    line = one_error_line(invoke("eval", "--checkpoint", tmp_path / "nope"))
    assert "not found" in line
