"""Bad input through the CLI: one line "error: ..." naming the file, key or value, exit status 2,
no traceback (unless --debug), and nothing written (the --out folder is not created, or an
existing one is left byte-for-byte unchanged).

Explicit cases first, then property-based tests (generated config files and .npz data files).
The minimal inputs the property tests once found to break the rule are kept as explicit tests
(``test_fixed_*``).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dptrain.cli import main
from dptrain.data import split_train_val
from dptrain.errors import UserError

from helpers import dptrain, needs_mpiexec

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

FAST = ["--set", "train.epochs=1", "--set", "model.hidden=[8]"]
SYNTHETIC = ["--set", "data.name=synthetic", "--set", "data.n_samples=40"]

_rng = np.random.default_rng(0)
X = _rng.standard_normal((12, 3))
LABELS = np.arange(12) % 3
TARGETS = _rng.standard_normal((12, 2))


def invoke(out: Path, *args: str, **kwargs):
    """`dptrain train --out OUT ARGS` in process; records Python warnings (a terminal would print them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["train", "--out", str(out), *args], **kwargs)
    result.warning_messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    return result


def describe(result) -> str:
    return (f"exit {result.exit_code}, exception {result.exception!r}, warnings {result.warning_messages}, "
            f"output {result.output!r}")


def diverged(result) -> bool:
    """Exit 3, documented as "the run diverged (NaN/inf) or the ranks went out of sync": input that
    passes every check (e.g. optim.lr = 1e30) but whose training blows up. Not bad input, yet it
    must still end in one "error: " line on stderr and no traceback."""
    err = result.stderr.splitlines()
    return (result.exit_code == 3 and isinstance(result.exception, SystemExit) and len(err) == 1
            and err[0].startswith("error: ") and "Traceback" not in result.output)


def refused_line(result) -> str | None:
    """The error line if ``result`` obeys the rule (bar naming and the out folder), else None."""
    lines = result.output.splitlines()
    ok = (result.exit_code == 2 and isinstance(result.exception, SystemExit) and len(lines) == 1
          and lines[0].startswith("error: ") and len(lines[0]) > len("error: ") and result.stdout == ""
          and not result.warning_messages)
    return lines[0] if ok else None


def assert_refused(result, out: Path, *names: str) -> str:
    __tracebackhide__ = True
    line = refused_line(result)
    assert line is not None, describe(result)
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    assert not out.exists(), f"{out} was created"
    return line


def npz(folder: Path, name: str, **arrays) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    assert path.is_file()
    return path


def npz_args(path: Path, *extra: str) -> list[str]:
    return ["--set", "data.name=npz", "--set", f"data.path={path}", *extra]


def snapshot(folder: Path) -> dict[str, object]:
    """Every file's bytes and every symlink's target under ``folder``."""
    tree: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            tree[rel] = ("link", str(p.readlink()))
        elif p.is_file():
            tree[rel] = p.read_bytes()
        else:
            tree[rel] = "dir"
    return tree


# ---------------------------------------------------------------------------------------------
# Config: one case per kind of refusal. Each builder takes tmp_path and returns (args, names).

def _config_file(text: str, name: str):
    def build(tmp: Path):
        path = tmp / name
        path.write_text(text, encoding="utf-8")
        return ["--config", str(path)], [str(path)]
    return build


def _config_file_with(text: str, name: str, *keys: str):
    def build(tmp: Path):
        args, names = _config_file(text, name)(tmp)
        return args, [*names, *keys]
    return build


def _sets(*assignments: str, names: tuple[str, ...]):
    def build(tmp: Path):
        return [a for s in assignments for a in ("--set", s)], list(names)
    return build


CONFIG_CASES = {
    "malformed_toml": _config_file_with("[train\nepochs = 1\n", "broken.toml", "not valid TOML"),
    "malformed_toml_duplicate_key": _config_file("seed = 1\nseed = 2\n", "dup.toml"),
    "not_utf8_toml": None,  # filled below (bytes)
    "unknown_key_in_file": _config_file_with("[optim]\nlearning_rate = 0.1\n", "unknown.toml", "optim.learning_rate"),
    "unknown_section_in_file": _config_file_with("[trainer]\nepochs = 1\n", "section.toml", "trainer"),
    "unknown_key_set": _sets("train.bogus=1", names=("train.bogus",)),
    "wrong_type_in_file": _config_file_with('[train]\nbatch_size = "64"\n', "types.toml", "train.batch_size", "'64'"),
    "wrong_type_bool_for_int": _sets("checkpoint.keep=true", names=("checkpoint.keep",)),
    "wrong_type_hidden_not_list": _sets("model.hidden=8", names=("model.hidden",)),
    "section_not_a_table": _config_file_with("optim = 3\n", "scalar.toml", "optim"),
    "lr_negative": _sets("optim.lr=-0.1", names=("optim.lr", "-0.1")),
    "lr_zero": _sets("optim.lr=0", names=("optim.lr",)),
    "lr_nan": _sets("optim.lr=nan", names=("optim.lr", "nan")),
    "lr_inf": _sets("optim.lr=inf", names=("optim.lr", "inf")),
    "batch_size_zero": _sets("train.batch_size=0", names=("train.batch_size",)),
    "batch_size_negative": _sets("train.batch_size=-5", names=("train.batch_size", "-5")),
    "val_fraction_one": _sets("data.val_fraction=1", names=("data.val_fraction",)),
    "val_fraction_negative": _sets("data.val_fraction=-0.1", names=("data.val_fraction", "-0.1")),
    "epochs_zero": _sets("train.epochs=0", names=("train.epochs",)),
    "epochs_negative": _sets("train.epochs=-3", names=("train.epochs", "-3")),
    "unknown_activation": _sets("model.activation=swish", names=("model.activation", "swish")),
    "unknown_loss": _sets("train.loss=hinge", names=("train.loss", "hinge")),
    "unknown_dataset": _sets("data.name=mnist", names=("data.name", "mnist")),
    "unknown_optimizer": _sets("optim.name=lamb", names=("optim.name", "lamb")),
    "unknown_dtype": _sets("train.dtype=float16", names=("train.dtype", "float16")),
    "no_training_samples_left": _sets("data.name=synthetic", "data.n_samples=10", "data.val_fraction=0.96",
                                      names=("data.val_fraction", "0.96")),
    "unknown_on_nan": _sets("train.on_nan=ignore", names=("train.on_nan", "ignore")),
    "check_sync_every_negative": _sets("train.check_sync_every=-1", names=("train.check_sync_every",)),
    # the cosine schedule's min_lr above the lr after the linear scaling rule (0.1 x 64 / 256)
    "min_lr_above_scaled_lr": _sets("optim.lr=0.1", "optim.min_lr=0.05", "optim.lr_reference_batch=256",
                                    "train.batch_size=64", "optim.schedule=cosine", names=("optim.min_lr",)),
    "set_without_equals": _sets("train.epochs", names=("train.epochs",)),
    "resume_missing_checkpoint": lambda tmp: (["--resume", str(tmp / "nowhere")], [str(tmp / "nowhere")]),
    "resume_and_overwrite": lambda tmp: (["--resume", "auto", "--overwrite"], ["--resume", "--overwrite"]),
}


def _not_utf8(tmp: Path):
    path = tmp / "latin1.toml"
    path.write_bytes(b'[model]\nactivation = "r\xe9lu"\n')
    return ["--config", str(path)], [str(path)]


CONFIG_CASES["not_utf8_toml"] = _not_utf8


@pytest.mark.parametrize("build", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, build):
    args, names = build(tmp_path)
    out = tmp_path / "run"
    # the case's own --set come last, so they win over FAST
    assert_refused(invoke(out, *FAST, *args), out, *names)


# ---------------------------------------------------------------------------------------------
# Data files

def _data(name: str, *extra: str, keys: tuple[str, ...] = (), **arrays):
    def build(tmp: Path):
        return npz_args(npz(tmp, name, **arrays), *extra), list(keys)
    return build


def _missing_file(tmp: Path):
    path = tmp / "nowhere" / "missing.npz"
    return npz_args(path), [str(path)]


def _directory(tmp: Path):
    path = tmp / "folder.npz"
    path.mkdir()
    return npz_args(path), [str(path)]


def _random_bytes(tmp: Path):
    path = tmp / "noise.npz"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return npz_args(path), [str(path)]


def _truncated_npz(tmp: Path):
    good = npz(tmp, "whole.npz", x=X, y=LABELS)
    path = tmp / "truncated.npz"
    path.write_bytes(good.read_bytes()[:200])
    return npz_args(path), [str(path)]


DATA_CASES = {
    "missing_file": _missing_file,
    "path_is_a_directory": _directory,
    "not_an_npz_random_bytes": _random_bytes,
    "no_x": _data("no_x.npz", keys=("'x'",), y=LABELS),
    "no_y": _data("no_y.npz", keys=("'y'",), x=X),
    "empty_npz": _data("empty.npz"),
    "x_y_lengths_differ": _data("lengths.npz", keys=("12", "11"), x=X, y=LABELS[:11]),
    "no_samples": _data("zero_rows.npz", x=X[:0], y=LABELS[:0]),
    "x_not_2d": _data("x1d.npz", x=X[:, 0], y=LABELS),
    "x_strings": _data("xstr.npz", x=np.array([["a", "b", "c"]] * 12), y=LABELS),
    "negative_labels": _data("negative.npz", x=X, y=LABELS - 1),
    "nan_in_x": _data("xnan.npz", keys=("NaN",), x=np.where(np.eye(12, 3) > 0, np.nan, X), y=LABELS),
    "inf_in_x": _data("xinf.npz", x=np.where(np.eye(12, 3) > 0, -np.inf, X), y=LABELS),
    "nan_in_float_targets": _data("ynan.npz", "--set", "train.loss=mse", x=X,
                                  y=np.where(np.eye(12, 2) > 0, np.nan, TARGETS)),
    "y_float_1d": _data("yfloat1d.npz", x=X, y=TARGETS[:, 0]),
    "y_int_2d": _data("yint2d.npz", x=X, y=LABELS.reshape(12, 1)),
    "regression_targets_with_cross_entropy": _data("regression.npz", "--set", "train.loss=cross_entropy",
                                                   keys=("train.loss", "cross_entropy"), x=X, y=TARGETS),
    "labels_with_mse": _data("labels.npz", "--set", "train.loss=mse", keys=("train.loss", "mse"), x=X, y=LABELS),
    "no_training_samples_left": _data("few.npz", "--set", "data.val_fraction=0.99", keys=("data.val_fraction",),
                                      x=X, y=LABELS),
}


@pytest.mark.parametrize("build", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path, build):
    args, keys = build(tmp_path)
    path = next(a.removeprefix("data.path=") for a in args if a.startswith("data.path="))
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *args), out, path, *keys)


class _Canary:
    """Unpickling this creates the file ``marker`` (via builtins.open): proof that the npz was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_array_is_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    x = np.empty((12, 3), dtype=object)
    x[:] = 1.0
    x[0, 0] = _Canary(marker)
    path = npz(tmp_path, "pickled.npz", x=x, y=LABELS)
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *npz_args(path)), out, str(path))
    assert not marker.exists(), "dptrain unpickled the data file"
    with np.load(path, allow_pickle=True) as archive:  # the canary is live: loading with pickle fires it
        archive["x"][0, 0].close()
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Existing run folders, --debug, MPI

def test_existing_run_is_not_overwritten_without_overwrite(tmp_path):
    out = tmp_path / "run"
    first = invoke(out, *FAST, *SYNTHETIC)
    assert first.exit_code == 0, describe(first)
    before = snapshot(out)
    assert any(k.startswith("checkpoints/step-") and k.endswith("model.npz") for k in before)
    assert "checkpoints/latest" in before and "config.toml" in before

    result = invoke(out, *FAST, *SYNTHETIC, "--set", "seed=1")
    line = refused_line(result)
    assert line is not None, describe(result)
    assert str(out) in line and "--overwrite" in line
    assert snapshot(out) == before

    # bad input aimed at the existing run leaves it alone too
    result = invoke(out, *FAST, *SYNTHETIC, "--set", "optim.lr=-1", "--overwrite")
    assert refused_line(result) is not None and "optim.lr" in result.output, describe(result)
    assert snapshot(out) == before


def test_existing_folder_without_checkpoints_is_unchanged_by_bad_input(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    result = invoke(out, *FAST, "--set", "train.batch_size=0")
    assert refused_line(result) is not None, describe(result)
    assert snapshot(out) == {"notes.txt": b"mine\n"}


def test_debug_still_fails_with_the_error(tmp_path):
    out = tmp_path / "run"
    result = invoke(out, *FAST, "--set", "optim.lr=-1", "--debug")
    assert result.exit_code != 0 and result.exception is not None
    assert "optim.lr" in result.output + str(result.exception)
    assert not out.exists()


def test_debug_shows_the_traceback_for_launch(tmp_path):
    """`launch` checks the config itself, outside the ranks' set-up: there --debug does propagate."""
    with pytest.raises(UserError, match="optim.lr"):
        CliRunner().invoke(main, ["launch", "-n", "2", "--mpirun", "mpiexec", "--debug", "--set", "optim.lr=-1"],
                           catch_exceptions=False)
    result = CliRunner().invoke(main, ["launch", "-n", "2", "--mpirun", "mpiexec", "--set", "optim.lr=-1"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_fixed_debug_shows_the_traceback(tmp_path):
    out = tmp_path / "run"
    result = invoke(out, *FAST, "--set", "optim.lr=-1", "--debug")
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError) and "optim.lr" in str(result.exception)
    assert result.exc_info is not None and result.exc_info[2] is not None
    with pytest.raises(UserError, match="optim.lr"):
        invoke(out, *FAST, "--set", "optim.lr=-1", "--debug", catch_exceptions=False)
    # a data error propagates too
    path = npz(tmp_path, "no_y.npz", x=X)
    with pytest.raises(UserError, match="no_y.npz"):
        invoke(out, *FAST, *npz_args(path), "--debug", catch_exceptions=False)
    assert not out.exists()


@needs_mpiexec
@pytest.mark.parametrize("n_samples", [3, 4])
def test_fewer_training_samples_than_ranks(tmp_path, n_samples):
    n_train = len(split_train_val(n_samples, 0.5, seed=0)[0])  # 3 -> 1 (round half to even), 4 -> 2
    assert n_train < 3
    out = tmp_path / "run"
    result = dptrain("train", "--out", str(out), "--set", "data.name=synthetic", "--set", f"data.n_samples={n_samples}",
                     "--set", "data.val_fraction=0.5", "--set", "train.epochs=1", ranks=3)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(rf"\b{n_train} training samples? for 3 ranks\b", lines[0]), lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Inputs that once broke the rule, reduced to minimal cases (now fixed)

def test_fixed_truncated_npz(tmp_path):
    args, names = _truncated_npz(tmp_path)
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *args), out, *names)


def test_fixed_x_with_zero_columns(tmp_path):
    path = npz(tmp_path, "nocols.npz", x=np.zeros((4, 0)), y=np.array([0, 1, 0, 1]))
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *npz_args(path)), out, str(path))


def test_fixed_y_scalar(tmp_path):
    path = npz(tmp_path, "yscalar.npz", x=np.zeros((4, 2)), y=np.array(1))
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *npz_args(path)), out, str(path))


def test_fixed_regression_targets_with_zero_columns(tmp_path):
    path = npz(tmp_path, "ynocols.npz", x=np.zeros((4, 2)), y=np.zeros((4, 0)))
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *npz_args(path, "--set", "train.loss=mse")), out, str(path))


@pytest.mark.parametrize("label", [10**12, 2**62])
def test_fixed_huge_label(tmp_path, label):
    path = npz(tmp_path, "hugelabel.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, label]))
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *npz_args(path)), out, str(path))


@pytest.mark.parametrize("key", ["data.n_features", "data.n_classes"])
@pytest.mark.parametrize("value", [10**12, 2**70])
def test_fixed_huge_synthetic_sizes(tmp_path, key, value):
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *SYNTHETIC, "--set", f"{key}={value}"), out, key)


@pytest.mark.parametrize("where", ["config_key", "set_key", "data_path"])
def test_fixed_line_break_in_a_name_makes_two_lines(tmp_path, where):
    cfg = tmp_path / "newline_key.toml"
    cfg.write_text('"bo\\ngus" = 1\n', encoding="utf-8")
    args = {"config_key": ["--config", str(cfg)],
            "set_key": ["--set", "bo\ngus=1"],
            "data_path": ["--set", "data.name=npz", "--set", 'data.path="new\\nline.npz"']}[where]
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, *args), out)


def test_fixed_config_path_is_a_directory(tmp_path):
    folder = tmp_path / "conf.toml"
    folder.mkdir()
    out = tmp_path / "run"
    assert_refused(invoke(out, *FAST, "--config", str(folder)), out, str(folder))


def test_fixed_out_is_an_existing_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("precious\n")
    try:
        line = refused_line(invoke(out, *FAST, *SYNTHETIC))
        assert line is not None and str(out) in line
    finally:
        assert out.read_text() == "precious\n"


def test_fixed_overflow_warning_before_error(tmp_path):
    path = npz(tmp_path, "big.npz", x=np.full((4, 2), 1e300), y=np.array([0, 1, 0, 1]))
    out = tmp_path / "run"
    # a real process: under pytest the warning would be captured, in a terminal it is printed
    result = dptrain("train", "--out", str(out), *FAST, *npz_args(path, "--set", "train.loss=mse"))
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


# ---------------------------------------------------------------------------------------------
# Property: generated config files

FORCED = ["--set", "train.epochs=1", "--set", "model.hidden=[4]", "--set", "data.name=synthetic",
          "--set", "data.n_samples=40"]

_huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63), 10**30])
_ints = st.one_of(st.integers(-3, 100), st.integers(), _huge_ints)
_small_ints = st.integers(-10, 64)  # for data.n_features / n_classes: huge ones are a known bug (see above)
_floats = st.one_of(st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 1e308]))
_words = st.sampled_from(["relu", "tanh", "sigmoid", "cross_entropy", "mse", "float32", "float64", "sgd",
                          "synthetic", "digits", "npz", "", "gelu"])
_strings = st.one_of(_words, st.text(max_size=12))


def _values(ints=_ints):
    scalars = st.one_of(ints, _floats, _strings, st.booleans())
    return st.one_of(scalars, st.lists(scalars, max_size=4),
                     st.dictionaries(st.text(min_size=1, max_size=5), scalars, max_size=2))


ANY = _values()
ANY_SMALL = _values(_small_ints)


def _key_values(good, anything=ANY):
    return {"good": good, "any": st.one_of(good, good, anything)}


SECTIONS = {
    "data": {
        "name": ANY, "path": ANY, "n_samples": ANY,  # overridden by FORCED
        "val_fraction": _key_values(st.one_of(st.floats(0, 0.99), st.sampled_from([0.0, 0.5, 0.98, 0.99]))),
        "shuffle": _key_values(st.booleans()),
        "n_features": _key_values(st.integers(1, 30), ANY_SMALL),
        "n_classes": _key_values(st.integers(2, 10), ANY_SMALL),
    },
    "model": {
        "hidden": ANY,  # overridden by FORCED
        "activation": _key_values(st.sampled_from(["relu", "tanh", "sigmoid"])),
    },
    "train": {
        "epochs": ANY,  # overridden by FORCED
        "batch_size": _key_values(st.one_of(st.integers(1, 64), _huge_ints)),
        "dtype": _key_values(st.sampled_from(["float32", "float64"])),
        "loss": _key_values(st.sampled_from(["cross_entropy", "mse"])),
        "on_nan": _key_values(st.sampled_from(["error", "skip"])),
        "check_sync_every": _key_values(st.integers(0, 5)),
    },
    "optim": {
        "name": _key_values(st.just("sgd")),
        "lr": _key_values(st.one_of(st.floats(1e-4, 1.0), st.sampled_from([1e-300, 1e30, 1e308]))),
        "momentum": _key_values(st.one_of(st.floats(0, 0.99), st.just(0.999999))),
        "nesterov": _key_values(st.booleans()),
        "weight_decay": _key_values(st.one_of(st.floats(0, 0.1), st.just(1e300))),
    },
    "checkpoint": {
        "every_steps": _key_values(st.one_of(st.integers(0, 10), _huge_ints)),
        "every_epochs": _key_values(st.one_of(st.integers(0, 3), _huge_ints)),
        "keep": _key_values(st.one_of(st.integers(1, 5), _huge_ints)),
    },
}
REAL_KEYS = ["seed", *(f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys)]
SEED = _key_values(st.one_of(st.integers(0, 10**6), _huge_ints))


def _pick(spec, mode: str):
    return spec if not isinstance(spec, dict) else spec["good" if mode == "good" else "any"]


def _rarely(n: int):
    """True once in ``n`` draws; False is the simplest choice, so shrinking and hypothesis'
    "simplest first" generation lean to the ordinary case."""
    return st.sampled_from([False] * (n - 1) + [True])


def _mostly(strategy, rare_value, n: int):
    """``strategy``, but ``rare_value`` once in ``n`` draws (never if n == 1)."""
    if n == 1:
        return strategy
    return st.sampled_from([False] * (n - 1) + [True]).flatmap(lambda rare: st.just(rare_value) if rare else strategy)


_bogus_keys = st.one_of(st.sampled_from(["lr", "epochs", "learning_rate", "hidden_layers", "Seed", "data.name"]),
                        st.text(min_size=1, max_size=8))
_bogus = st.one_of(st.just({}), st.just({}), st.dictionaries(_bogus_keys, ANY, max_size=2))


@st.composite
def config_trees(draw):
    """A config tree: "clean" (real keys, valid-looking values), "one_bad" (clean plus one bogus
    key or wrong value) or "chaos" (any value for any key, bogus keys, sections that are not tables)."""
    mode = draw(st.sampled_from(["clean", "clean", "one_bad", "chaos", "chaos"]))
    chaos = mode == "chaos"
    tree = dict(draw(_bogus)) if chaos else {}
    if draw(st.booleans()):
        tree["seed"] = draw(_pick(SEED, "any" if chaos else "good"))
    for section, keys in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        if chaos and draw(_rarely(10)):
            tree[section] = draw(ANY)  # not a table
            continue
        table = dict(draw(_bogus)) if chaos and draw(_rarely(4)) else {}
        table.update(draw(st.fixed_dictionaries(
            {}, optional={k: _pick(v, "any" if chaos else "good") for k, v in keys.items()})))
        tree[section] = table
    if mode == "one_bad":
        section = draw(st.sampled_from([None, *SECTIONS]))
        key = draw(st.one_of(_bogus_keys, st.sampled_from(list(SECTIONS[section]) if section else ["seed"])))
        node = tree if section is None else tree.setdefault(section, {})
        node[key] = draw(ANY)
    return mode, tree


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_string(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # nan, inf, -inf, 1e+300 ... are TOML
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(tree: dict) -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines.append(f"\n[{_toml_key(k)}]")
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _kind(line: str | None, path: str) -> str:
    """A coarse label of an error line, for hypothesis' statistics."""
    if line is None:
        return "not a one-line error"
    text = re.sub(r"\(.*", "", line.replace(path, "FILE"))
    return "refused: " + " ".join(text.split()[1:6])


def _all_keys(tree):
    for k, v in tree.items():
        yield k
        if isinstance(v, dict):
            yield from _all_keys(v)



@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode_tree=config_trees(), garbage=st.one_of(st.just(""), st.text(max_size=15)))
def test_generated_config_files_run_or_are_refused_in_one_line(mode_tree, garbage):
    mode, tree = mode_tree
    if mode != "chaos":
        garbage = ""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "generated.toml", Path(tmp) / "run"
        text = to_toml(tree) + garbage
        cfg.write_text(text, encoding="utf-8")
        result = invoke(out, "--config", str(cfg), *FORCED)
        assert result.exception is None or isinstance(result.exception, SystemExit), describe(result)
        assert result.exit_code in (0, 2, 3), describe(result)
        if result.exit_code == 0:
            assert "done in" in result.output and (out / "config.toml").is_file()
            event(f"{mode}: trained")
            return
        if result.exit_code == 3:
            assert diverged(result), describe(result)
            event(f"{mode}: diverged (exit 3)")
            return
        line = refused_line(result)
        event(f"{mode}: {_kind(line, str(cfg))}")
        assert line is not None, describe(result)
        assert str(cfg) in line or "--set" in line or any(k in line for k in REAL_KEYS), line
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Property: generated .npz data files

_X_DTYPES = ["float64", "float32", "int64", "int8", "bool", "U3", "object"]


def _elements(dtype: str, plausible: bool = False):
    if dtype.startswith("float"):
        finite = st.floats(-10, 10, width=32)
        return finite if plausible else st.one_of(finite, hnp.from_dtype(np.dtype(dtype)))  # nan, inf, 1e308 ...
    if dtype == "object":
        return st.one_of(st.integers(-5, 5), st.floats(-1, 1), st.text(max_size=2), st.none())
    if plausible:
        return st.integers(-100, 100)
    return hnp.from_dtype(np.dtype(dtype))


@st.composite
def arrays_of(draw, dtypes, shape, plausible=False):
    dtype = draw(st.sampled_from(dtypes))
    return draw(hnp.arrays(np.dtype(dtype), shape, elements=_elements(dtype, plausible)))


@st.composite
def npz_contents(draw):
    """x and y for an .npz: "plausible" (2-d numeric x, matching labels or targets, mostly finite)
    or "fuzz" (0-3 dims, 0-20 rows, 0-5 columns, any dtype, mismatched lengths, missing keys)."""
    plausible = draw(st.sampled_from([True, False]))
    n = draw(_mostly(st.integers(1, 20), 0, 1 if plausible else 8))
    cols = draw(_mostly(st.integers(1, 5), 0, 10))
    ndim = 2 if plausible else draw(st.sampled_from([2, 2, 0, 1, 3]))
    shape = ((), (n,), (n, cols), (n, draw(st.integers(0, 3)), 2))[ndim]
    x = draw(arrays_of(["float64", "float32", "int64"] if plausible else _X_DTYPES, shape, plausible))
    ny = draw(st.integers(0, 20)) if not plausible and draw(_rarely(4)) else n  # mostly matching lengths
    kind = draw(st.sampled_from(["labels", "targets"] if plausible else ["labels", "targets", "floats_1d", "other"]))
    if kind == "labels":  # labels up to 30: huge labels are a known bug (see above)
        dtype = draw(st.sampled_from([np.int64, np.int32, np.uint8]))
        low = 0 if dtype == np.uint8 else -3
        y = draw(hnp.arrays(dtype, (ny,), elements=st.one_of(st.integers(0, 9), st.integers(low, 30))))
    elif kind == "targets":
        y = draw(arrays_of(["float64", "float32"], (ny, draw(_mostly(st.integers(1, 4), 0, 10))), plausible))
    elif kind == "floats_1d":
        y = draw(arrays_of(["float64"], (ny,)))
    else:
        y = draw(arrays_of(["int64", "bool", "U3", "object", "float64"], draw(st.sampled_from([(), (ny, 1), (ny, 2, 1)]))))
    if plausible and draw(_rarely(4)):  # one bad value in otherwise fine data
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if x.dtype.kind == "f" and x.size:
            x.flat[draw(st.integers(0, x.size - 1))] = bad
        elif y.dtype.kind == "f" and y.size:
            y.flat[draw(st.integers(0, y.size - 1))] = bad
    arrays = {"x": x, "y": y}
    if not plausible and draw(_rarely(8)):
        del arrays[draw(st.sampled_from(["x", "y"]))]
    if draw(_rarely(8)):
        arrays["z"] = np.arange(3)
    losses = {"labels": "cross_entropy", "targets": "mse"}
    if plausible and kind in losses and not draw(_rarely(4)):
        loss = losses[kind]
    else:
        loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    return ("plausible" if plausible else "fuzz"), arrays, loss




@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=npz_contents(), dtype=st.sampled_from(["float32", "float64"]))
def test_generated_npz_files_train_or_are_refused_in_one_line(contents, dtype):
    mode, arrays, loss = contents
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "generated.npz", Path(tmp) / "run"
        np.savez(path, **arrays)
        result = invoke(out, *npz_args(path), "--set", "train.epochs=1", "--set", "model.hidden=[4]",
                        "--set", f"train.loss={loss}", "--set", f"train.dtype={dtype}")
        if result.exit_code == 0 and result.exception is None:
            assert "done in" in result.output and (out / "config.toml").is_file()
            event(f"{mode}: trained")
            return
        if diverged(result):
            event(f"{mode}: diverged (exit 3)")
            return
        line = refused_line(result)
        event(f"{mode}: {_kind(line, str(path))}")
        assert line is not None, describe(result)
        assert str(path) in line, line
        assert not out.exists()


def test_a_file_where_the_run_folder_should_go_is_one_line_and_exit_74(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "afile" / "run"), "--set", "train.epochs=1"])
    assert result.exit_code == 74, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert lines == [f"error: {tmp_path / 'afile' / 'run'}: Not a directory (a failure of the environment: disk, "
                     f"permissions or file system)"]
    assert "Traceback" not in result.output


@needs_mpiexec
def test_a_file_where_the_run_folder_should_go_under_mpi_is_one_line_and_exit_74(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = dptrain("train", "--out", str(tmp_path / "afile" / "run"), "--set", "train.epochs=1", ranks=2)
    assert result.returncode == 74, (result.stdout, result.stderr)
    assert f"[rank 0] error: {tmp_path / 'afile' / 'run'}: Not a directory" in result.stderr
    assert "Traceback" not in result.stderr
