"""CSV datasets (data.name = "csv"): a header row, the data.target column as labels, every other
column a feature in file order; bad files refused in one line naming the file, row and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.config import load_config
from dptrain.data import MAX_CLASSES, load_csv, read_csv
from dptrain.errors import UserError

FAST = ["--set", "train.epochs=1", "--set", "model.hidden=[8]", "--set", "data.val_fraction=0.25"]


def write(folder: Path, text: str, name: str = "d.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def train(out: Path, path: Path, target: str = "y", *extra: str):
    args = ["train", "--out", str(out), *FAST, "--set", "data.name=csv", "--set", f"data.path={path}",
            "--set", f"data.target={target}", *extra]
    return CliRunner().invoke(main, args)


# ---------------------------------------------------------------------------------------------
# Reading

def test_classification_labels_and_column_order(tmp_path):
    path = write(tmp_path, "a,label,b,c\n1,0,2,3\n4,2,5,6\n7,1.0,8,9.5\n")
    d = load_csv(str(path), "label")
    assert d.task == "classification" and d.n_classes == 3 and d.n_outputs == 3
    np.testing.assert_array_equal(d.x, [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]])  # a, b, c: file order
    np.testing.assert_array_equal(d.y, [0, 2, 1])
    assert d.x.dtype == np.float64 and d.y.dtype == np.int64 and d.source == str(path)


def test_labels_with_gaps_give_max_plus_one_classes(tmp_path):
    d = load_csv(str(write(tmp_path, "x,y\n0.5,0\n1.5,4\n")), "y")
    assert d.n_classes == 5


def test_one_class_still_makes_two_outputs(tmp_path):
    d = load_csv(str(write(tmp_path, "x,y\n0.5,0\n1.5,0\n")), "y")
    assert d.n_classes == 2  # as for .npz data


def test_float_targets_are_regression(tmp_path):
    path = write(tmp_path, "y,a,b\n1.5,1,2\n-2,3,4\n0,5,6\n")
    d = load_csv(str(path), "y")
    assert d.task == "regression" and d.n_classes is None and d.n_outputs == 1
    np.testing.assert_array_equal(d.y, [[1.5], [-2.0], [0.0]])  # one non-whole value makes them all floats
    np.testing.assert_array_equal(d.x, [[1, 2], [3, 4], [5, 6]])
    assert d.y.dtype == np.float64


def test_negative_floats_are_fine_for_regression(tmp_path):
    d = load_csv(str(write(tmp_path, "a,y\n1,-0.5\n2,-3.25\n")), "y")
    np.testing.assert_array_equal(d.y, [[-0.5], [-3.25]])


def test_blank_lines_crlf_bom_quotes_and_spaces(tmp_path):
    text = '\ufeff"a", "b" ,y\r\n1, "2.5",0\r\n\r\n 3 ,4,1\r\n'
    d = load_csv(str(write(tmp_path, text)), "y")
    np.testing.assert_array_equal(d.x, [[1, 2.5], [3, 4]])
    np.testing.assert_array_equal(d.y, [0, 1])


def test_header_names_are_stripped(tmp_path):
    d = load_csv(str(write(tmp_path, " a , y \n1,2\n")), "y")
    assert d.n_features == 1


def test_a_clean_file_takes_the_fast_parser(tmp_path):
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.standard_normal((500, 4)), rng.integers(0, 3, 500)])
    path = tmp_path / "d.csv"
    np.savetxt(path, values, delimiter=",", header="a,b,c,d,y", comments="", fmt="%.17g")
    _, parsed, lines = read_csv(str(path), "test")
    assert lines is None  # np.loadtxt read it; no per-cell Python work
    np.testing.assert_array_equal(parsed, values)
    d = load_csv(str(path), "y")
    np.testing.assert_array_equal(d.x, values[:, :4])
    np.testing.assert_array_equal(d.y, values[:, 4].astype(np.int64))


def test_fast_and_slow_parsers_agree(tmp_path):
    values = [(i * 0.1, -i * 1e-7, i % 3) for i in range(50)]
    plain = "\n".join(f"{a:.17g},{b:.17g},{y}" for a, b, y in values)
    quoted = "\n".join(f'{a:.17g}, "{b:.17g}",{y}' for a, b, y in values)  # np.loadtxt cannot read these
    fast = load_csv(str(write(tmp_path, f"a,b,y\n{plain}\n", "plain.csv")), "y")
    slow = load_csv(str(write(tmp_path, f"a,b,y\n{quoted}\n", "quoted.csv")), "y")
    assert read_csv(str(tmp_path / "quoted.csv"), "test")[2] is not None  # the csv module read it
    np.testing.assert_array_equal(fast.x, slow.x)
    np.testing.assert_array_equal(fast.y, slow.y)


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the row (the file's line, the header being row 1) and column

BAD_FILES = {
    "missing_target": ("a,b,c\n1,2,3\n", ("no column named 'y' (data.target) in the header row; "
                                          "the columns are 'a', 'b', 'c'")),
    "empty_file": ("", "is empty"),
    "blank_file": ("\n\n", "is empty"),
    "header_only": ("a,y\n", "has a header row but no data rows"),
    "header_and_blank_lines": ("a,y\n\n\n", "has a header row but no data rows"),
    "short_row": ("a,b,y\n1,2,0\n3,4\n", "row 3 has 2 cells, but the header has 3 columns"),
    "long_row": ("a,b,y\n1,2,0\n3,4,1\n5,6,7,8\n", "row 4 has 4 cells, but the header has 3 columns"),
    "one_cell_row": ("a,b,y\n1,2,0\n5\n", "row 3 has 1 cell, but the header has 3 columns"),
    "non_numeric": ("a,b,y\n1,2,0\n3,abc,1\n", "row 3, column 'b': 'abc' is not a number"),
    "empty_cell": ("a,b,y\n1,2,0\n3,4,1\n,6,0\n", "row 4, column 'a': an empty cell"),
    "empty_target": ("a,b,y\n1,2,0\n3,4,\n", "row 3, column 'y': an empty cell"),
    "blank_line_counts": ("a,b,y\n1,2,0\n\n3,x,1\n", "row 4, column 'b': 'x' is not a number"),
    "nan": ("a,b,y\n1,2,0.5\n3,nan,1\n", "row 3, column 'b': 'nan' is not a finite number"),
    "inf_target": ("a,b,y\n1,2,0.5\n3,4,1\n5,6,-inf\n", "row 4, column 'y': '-inf' is not a finite number"),
    "first_problem_wins": ("a,b,y\n1,2,0\n3,nan,1\n3,4\n", "row 3, column 'b'"),
    "negative_label": ("a,y\n1,0\n2,3\n3,-1\n", "row 4, column 'y': class label -1 is negative"),
    "huge_label": (f"a,y\n1,0\n2,{MAX_CLASSES}\n", f"row 3, column 'y': class label {MAX_CLASSES}"),
    "only_target": ("y\n1\n2\n", "no feature column besides the target 'y'"),
    "target_twice": ("y,a,y\n1,2,3\n", "2 columns are named 'y'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_a_user_error_naming_the_row_and_column(tmp_path, case):
    text, expected = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_csv(str(path), "y")
    message = str(info.value)
    assert message == f"data file {path}: {expected}" or message.startswith(f"data file {path}: {expected}"), message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_exits_2_in_one_line_writing_nothing(tmp_path, case):
    text, expected = BAD_FILES[case]
    path = write(tmp_path, text)
    out = tmp_path / "run"
    result = train(out, path)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data file {path}: {expected}"), lines
    assert not out.exists()


def test_many_columns_are_listed_briefly(tmp_path):
    path = write(tmp_path, ",".join(f"c{i}" for i in range(100)) + "\n" + ",".join(["1"] * 100) + "\n")
    with pytest.raises(UserError, match=r"'c19', \.\.\. \(100 columns\)$"):
        load_csv(str(path), "y")


def test_a_numeric_first_row_is_not_a_header(tmp_path):
    with pytest.raises(UserError, match=r"the first row \(1, 2\) is numbers; expected a header row naming the columns"):
        load_csv(str(write(tmp_path, "1,2\n3,4\n")), "y")


def test_row_numbers_are_lines_of_the_file(tmp_path):
    """A quoted cell may hold a line break: a record spanning lines is named by its last line."""
    path = write(tmp_path, 'a,b,y\n1,"2\n",0\n3,x,1\n')  # the first record is lines 2-3
    with pytest.raises(UserError, match="row 4, column 'b': 'x' is not a number"):
        load_csv(str(path), "y")
    path = write(tmp_path, 'a,b,y\n1,"x\n",0\n')
    with pytest.raises(UserError, match="row 3, column 'b': 'x\\\\n' is not a number"):
        load_csv(str(path), "y")


def test_not_utf8(tmp_path):
    path = write(tmp_path, "a,y\n\xe9,1\n", encoding="latin-1")
    with pytest.raises(UserError, match=f"data file {path}: is not UTF-8 text"):
        load_csv(str(path), "y")


def test_nul_byte_is_invalid_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,y\n1,0\n2\x00,1\n")
    with pytest.raises(UserError, match=f"data file {path}: row 3"):
        load_csv(str(path), "y")


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_missing_file_or_folder(tmp_path, where):
    path = tmp_path / "d.csv"
    if where == "folder":
        path.mkdir()
    out = tmp_path / "run"
    result = train(out, path)
    assert result.exit_code == 2
    expected = "not found" if where == "missing" else "is a folder, not a CSV file"
    assert result.output.splitlines() == [f"error: data file {path}: {expected}"]
    assert not out.exists()


def test_no_target_in_the_python_api(tmp_path):
    with pytest.raises(UserError, match="no target column given"):
        load_csv(str(write(tmp_path, "a,y\n1,2\n")), "")


# ---------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("overrides, key", [
    (["data.name=csv", "data.target=y"], "data.path"),
    (["data.name=csv", "data.path=d.csv"], "data.target"),
])
def test_csv_needs_path_and_target(overrides, key):
    with pytest.raises(UserError, match=f"{key} must name"):
        load_config(None, overrides)


def test_csv_config_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--set", "data.name=csv",
                                       "--set", f"data.path={tmp_path / 'd.csv'}"])
    assert result.exit_code == 2 and "data.target" in result.output and not out.exists()


def test_target_round_trips_through_the_saved_config(tmp_path):
    cfg = load_config(None, ["data.name=csv", "data.path=d.csv", "data.target=price (USD)"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(str(path)) == cfg and cfg.data.target == "price (USD)"


# ---------------------------------------------------------------------------------------------
# Training on CSV data

def _csv_from(path: Path, x: np.ndarray, y: np.ndarray, fmt: str) -> Path:
    names = [f"f{i}" for i in range(x.shape[1])]
    np.savetxt(path, np.column_stack([y, x]), delimiter=",", header=",".join(["target", *names]),
               comments="", fmt=fmt)
    return path


def test_trains_a_classifier_from_csv(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    x = np.eye(3)[y] * 3 + rng.standard_normal((120, 3)) * 0.3
    path = _csv_from(tmp_path / "c.csv", x, y, "%.6g")
    out = tmp_path / "run"
    result = train(out, path, "target", "--set", "train.epochs=20")
    assert result.exit_code == 0, result.output
    accuracy = float(result.output.split("val_accuracy ")[-1].split(",")[0].split(";")[0])
    assert accuracy > 0.9


def test_trains_a_regressor_from_csv_reporting_rmse_and_r2(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 2))
    y = x @ np.array([1.5, -2.0]) + 0.1 * rng.standard_normal(200) + 0.25  # not whole numbers
    path = _csv_from(tmp_path / "r.csv", x, y, "%.9g")
    out = tmp_path / "run"
    result = train(out, path, "target", "--set", "train.loss=mse", "--set", "optim.name=adam",
                   "--set", "optim.lr=0.01", "--set", "train.epochs=30")
    assert result.exit_code == 0, result.output
    last_epoch = next(line for line in result.output.splitlines() if line.startswith("epoch 30/30"))
    assert "val_rmse" in last_epoch and "val_r2" in last_epoch
    assert float(last_epoch.split("val_r2 ")[1].split()[0]) > 0.9


def test_the_loss_decides_labels_or_targets(tmp_path):
    """Whole-number targets are regression targets for mse and class labels for cross-entropy;
    a fraction is refused as a class label, naming its row and column."""
    path = write(tmp_path, "a,y\n1,3\n2,5\n3,4\n4,1\n5,2\n")
    result = train(tmp_path / "mse", path, "y", "--set", "train.loss=mse", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "val_rmse" in result.output
    result = train(tmp_path / "ce", path, "y", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "val_accuracy" in result.output
    path = write(tmp_path, "a,y\n1,3\n2,0.5\n3,4\n")
    out = tmp_path / "frac"
    result = train(out, path, "y")
    assert result.exit_code == 2 and "row 3, column 'y': 0.5 is not a class label" in result.output
    assert not out.exists()
