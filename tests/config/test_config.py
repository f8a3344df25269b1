"""Typed config loading: defaults, the shipped file, --set overrides, and every kind of refusal."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dptrain.config import Config, config_from_dict, load_config, replace
from dptrain.config.schema import ACTIVATION_NAMES, DATASETS, DTYPES, LOSS_NAMES, OPTIMIZER_NAMES
from dptrain.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOML = REPO_ROOT / "configs" / "digits_mlp.toml"


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def user_error(path=None, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(None if path is None else str(path), overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Defaults and the shipped file


def test_defaults_equal_config():
    assert load_config() == Config()
    assert load_config(None, []) == Config()


def test_shipped_file_is_the_builtin_default():
    assert DEFAULT_TOML.is_file()
    assert load_config(str(DEFAULT_TOML)) == Config()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(str(write(tmp_path, ""))) == Config()


def test_file_values_are_applied(tmp_path):
    path = write(tmp_path, 'seed = 7\n[train]\nepochs = 3\n[model]\nhidden = [32, 16]\nactivation = "tanh"\n')
    cfg = load_config(str(path))
    assert cfg.seed == 7 and cfg.train.epochs == 3
    assert cfg.model.hidden == (32, 16) and cfg.model.activation == "tanh"
    # untouched keys keep their defaults
    assert cfg.train.batch_size == Config().train.batch_size
    assert cfg.optim == Config().optim


# ---------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("train.epochs=5", "train", "epochs", 5),
        ("train.batch_size = 128", "train", "batch_size", 128),
        ("optim.lr=0.125", "optim", "lr", 0.125),
        ("optim.lr=1", "optim", "lr", 1.0),  # an integer is accepted where a number is expected
        ("optim.weight_decay=1e-4", "optim", "weight_decay", 1e-4),
        ("optim.nesterov=true", "optim", "nesterov", True),
        ("data.shuffle=false", "data", "shuffle", False),
        ("model.hidden=[64, 32]", "model", "hidden", (64, 32)),
        ("model.hidden=[]", "model", "hidden", ()),
        ("data.name=synthetic", "data", "name", "synthetic"),  # unquoted -> a string
        ('data.name="synthetic"', "data", "name", "synthetic"),
        ("model.activation=tanh", "model", "activation", "tanh"),
        ("data.path=some/dir/x.npz", "data", "path", "some/dir/x.npz"),
        ("train.dtype=float64", "train", "dtype", "float64"),
    ],
)
def test_set_overrides(override, section, key, expected):
    cfg = load_config(None, [override])
    value = getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected)
    assert cfg == replace(Config(), **{section: {key: expected}})  # everything else is the default


def test_set_top_level_and_order(tmp_path):
    path = write(tmp_path, "seed = 3\n[train]\nepochs = 2\n")
    cfg = load_config(str(path), ["seed=11", "train.epochs=4", "train.epochs=6"])
    assert cfg.seed == 11 and cfg.train.epochs == 6  # --set beats the file; the last --set wins


@pytest.mark.parametrize("override", ["novalue", "=3", " = 3"])
def test_malformed_override(override):
    assert "KEY=VALUE" in user_error(overrides=[override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=0.1", "train.lr"),
        ("foo=1", "foo"),
        ("foo.bar=1", "foo"),
        ("train.batch_size=abc", "train.batch_size"),
        ('train.batch_size="64"', "train.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("seed.x=1", "seed"),
    ],
)
def test_bad_override_names_the_key(override, key):
    assert key in user_error(overrides=[override])


def test_set_through_a_scalar_is_refused(tmp_path):
    path = write(tmp_path, "data = 3\n")
    assert "data" in user_error(path, ["data.name=digits"])


# ---------------------------------------------------------------------------------------------
# Refusals from a file, naming the key (and the file)


@pytest.mark.parametrize(
    "text, key",
    [
        ("foo = 1\n", "foo"),
        ("[foo]\nbar = 1\n", "foo"),
        ("[train]\nlr = 0.1\n", "train.lr"),
        ("[data]\nnmae = \"digits\"\n", "data.nmae"),
        ("[checkpoint]\nevery = 1\n", "checkpoint.every"),
    ],
)
def test_unknown_key(tmp_path, text, key):
    path = write(tmp_path, text)
    message = user_error(path)
    assert re.search(rf"unknown key {re.escape(key)}\b", message), message
    assert str(path) in message


@pytest.mark.parametrize(
    "text, key",
    [
        ('[train]\nbatch_size = "64"\n', "train.batch_size"),
        ("[train]\nepochs = 1.5\n", "train.epochs"),
        ("[train]\nepochs = true\n", "train.epochs"),
        ("[model]\nhidden = 3\n", "model.hidden"),
        ("[model]\nhidden = [64, 1.5]\n", "model.hidden[1]"),
        ('[model]\nhidden = [64, "a"]\n', "model.hidden[1]"),
        ("[model]\nactivation = 1\n", "model.activation"),
        ("[data]\nshuffle = 1\n", "data.shuffle"),
        ("[data]\nval_fraction = \"0.2\"\n", "data.val_fraction"),
        ("[optim]\nlr = true\n", "optim.lr"),
        ("[optim]\nnesterov = \"false\"\n", "optim.nesterov"),
        ("seed = 1.0\n", "seed"),
        ("seed = true\n", "seed"),
        ("seed = [1]\n", "seed"),
        ("data = 3\n", "data"),
        ("[train.dtype]\nx = 1\n", "train.dtype"),
        ("[checkpoint]\nkeep = 1979-05-27\n", "checkpoint.keep"),
    ],
)
def test_wrong_type(tmp_path, text, key):
    path = write(tmp_path, text)
    message = user_error(path)
    assert key in message, message
    assert str(path) in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("[optim]\nlr = -1\n", "optim.lr"),
        ("[optim]\nlr = 0\n", "optim.lr"),
        ("[optim]\nlr = 0.0\n", "optim.lr"),
        ("[optim]\nlr = inf\n", "optim.lr"),
        ("[optim]\nlr = nan\n", "optim.lr"),
        ("[optim]\nmomentum = 1.0\n", "optim.momentum"),
        ("[optim]\nmomentum = -0.1\n", "optim.momentum"),
        ("[optim]\nmomentum = 0.0\nnesterov = true\n", "optim.nesterov"),
        ("[optim]\neps = 0.0\n", "optim.eps"),
        ("[optim]\neps = 1.0\n", "optim.eps"),
        ("[optim]\neps = nan\n", "optim.eps"),
        ("[optim]\nbetas = [0.9, 1.0]\n", "optim.betas"),
        ("[optim]\nbetas = [0.9]\n", "optim.betas"),
        ("[optim]\nalpha = 1.0\n", "optim.alpha"),
        ('[optim]\nname = "adam"\nmomentum = 1.0\n', "optim.momentum"),  # checked whichever optimizer
        ("[optim]\nmin_lr = 0.05\n", "optim.min_lr"),  # = optim.lr
        ("[optim]\nlr = 0.1\nmin_lr = 0.05\nlr_reference_batch = 256\n", "optim.min_lr"),  # scaled lr 0.025
        ("[optim]\nweight_decay = -0.01\n", "optim.weight_decay"),
        ("[optim]\nweight_decay = nan\n", "optim.weight_decay"),
        ("[train]\nbatch_size = 0\n", "train.batch_size"),
        ("[train]\nbatch_size = -5\n", "train.batch_size"),
        ("[train]\nepochs = 0\n", "train.epochs"),
        ("[data]\nval_fraction = 1\n", "data.val_fraction"),
        ("[data]\nval_fraction = 1.0\n", "data.val_fraction"),
        ("[data]\nval_fraction = -0.1\n", "data.val_fraction"),
        ("[data]\nval_fraction = nan\n", "data.val_fraction"),
        ('[model]\nactivation = "swish"\n', "model.activation"),
        ("[model]\nhidden = [64, 0]\n", "model.hidden[1]"),
        ('[train]\nloss = "hinge"\n', "train.loss"),
        ('[data]\nname = "imagenet"\n', "data.name"),
        ('[data]\nname = "npz"\n', "data.path"),
        ('[data]\nname = "synthetic"\nn_classes = 1\n', "data.n_classes"),
        ('[data]\nname = "synthetic"\nn_samples = 1\n', "data.n_samples"),
        ('[data]\nname = "synthetic"\nn_features = 0\n', "data.n_features"),
        ('[optim]\nname = "lamb"\n', "optim.name"),
        ('[train]\ndtype = "float16"\n', "train.dtype"),
        ("seed = -1\n", "seed"),
        ("[checkpoint]\nkeep = 0\n", "checkpoint.keep"),
        ("[checkpoint]\nevery_steps = -1\n", "checkpoint.every_steps"),
        ("[checkpoint]\nevery_epochs = -1\n", "checkpoint.every_epochs"),
    ],
)
def test_out_of_range(tmp_path, text, key):
    path = write(tmp_path, text)
    message = user_error(path)
    assert key in message, message
    assert str(path) in message


@pytest.mark.parametrize(
    "text",
    [
        "[optim]\nlr = 1e-12\n",
        "[data]\nval_fraction = 0\n",
        "[data]\nval_fraction = 0.999\n",
        "[optim]\nmomentum = 0\n",
        "[checkpoint]\nevery_steps = 0\nevery_epochs = 0\nkeep = 1\n",
        '[data]\nname = "npz"\npath = "x.npz"\n',
        "[train]\nepochs = 1\nbatch_size = 1\n",
        "[optim]\neps = 0.999\n",
        # min_lr is compared with the lr after the linear scaling rule: 0.1 x 256 / 64 = 0.4
        '[train]\nbatch_size = 256\n[optim]\nlr = 0.1\nmin_lr = 0.2\nlr_reference_batch = 64\nschedule = "cosine"\n',
    ],
)
def test_boundary_values_are_accepted(tmp_path, text):
    assert isinstance(load_config(str(write(tmp_path, text))), Config)


@pytest.mark.parametrize("text", ["seed = = 1\n", "[train\nepochs = 1\n", "seed = 1\nseed = 2\n", "x = 'a\n"])
def test_malformed_toml_names_the_file(tmp_path, text):
    path = write(tmp_path, text, name="broken.toml")
    message = user_error(path)
    assert str(path) in message and "TOML" in message


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[data]\npath = "caf\xe9"\n'.encode("latin-1"))
    assert str(path) in user_error(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "does_not_exist.toml"
    message = user_error(path)
    assert str(path) in message and "not found" in message


def test_directory_names_the_path(tmp_path):
    assert str(tmp_path) in user_error(tmp_path)


# ---------------------------------------------------------------------------------------------
# Round trips


NON_DEFAULT = replace(
    Config(),
    seed=12345,
    data={"name": "npz", "path": 'dir with spaces/ünïcode "quoted" \\ back\tslash.npz', "val_fraction": 0.0,
          "shuffle": False, "n_samples": 3, "n_features": 1, "n_classes": 2},
    model={"hidden": (300, 7, 1), "activation": "sigmoid"},
    train={"epochs": 1, "batch_size": 1, "dtype": "float64", "loss": "mse"},
    optim={"lr": 1e-7, "momentum": 0.0, "nesterov": False, "weight_decay": 0.1 + 0.2},
    checkpoint={"every_steps": 5, "every_epochs": 0, "keep": 1},
)


@pytest.mark.parametrize("cfg", [Config(), NON_DEFAULT, replace(Config(), model={"hidden": ()})],
                         ids=["default", "non_default", "no_hidden"])
def test_to_toml_round_trip(tmp_path, cfg):
    path = write(tmp_path, cfg.to_toml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("cfg", [Config(), NON_DEFAULT], ids=["default", "non_default"])
def test_config_from_dict_round_trip(cfg):
    tree = cfg.to_dict()
    json.dumps(tree)  # plain data, e.g. for a checkpoint's meta.json
    assert config_from_dict(tree) == cfg
    assert config_from_dict(json.loads(json.dumps(tree))) == cfg


def test_config_from_dict_refuses_bad_trees():
    tree = Config().to_dict()
    tree["train"]["epochs"] = 0
    with pytest.raises(UserError, match="train.epochs"):
        config_from_dict(tree, where="checkpoint meta.json")
    tree = Config().to_dict()
    tree["optim"]["bogus"] = 1
    with pytest.raises(UserError, match="optim.bogus"):
        config_from_dict(tree)


# ---------------------------------------------------------------------------------------------
# Property tests

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
SECTION_KEYS = {
    name: [f.name for f in dataclasses.fields(getattr(Config(), name))]
    for name in SECTIONS
    if dataclasses.is_dataclass(getattr(Config(), name))
}
TOP_KEYS = list(SECTIONS)
BOGUS_KEYS = ["foo", "lr", "Data", "train ", "seed.x", "", "é", "hidden"]
CHOICE_STRINGS = sorted({*DATASETS, *ACTIVATION_NAMES, *LOSS_NAMES, *OPTIMIZER_NAMES, *DTYPES, "lamb", "swish"})

text_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
leaf_values = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # the range TOML guarantees
    st.integers(min_value=10**300, max_value=10**400),  # too large for a float: still a UserError
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    st.sampled_from(CHOICE_STRINGS),
    text_values,
    st.dates(),
)
values = st.recursive(
    leaf_values,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(BOGUS_KEYS + ["name", "lr", "epochs"]), children, max_size=3),
    ),
    max_leaves=6,
)


def toml_string(s: str) -> str:
    """A TOML basic string: JSON escapes for quotes, backslashes and controls, everything else raw."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # nan, inf, -inf and 1e-05 are all TOML
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return v.isoformat()  # a date


def toml_document(tree: dict) -> str:
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, table in tree.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(k)}]")
            lines.extend(f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in table.items())
    return "\n".join(lines) + "\n"


# values of the type a key expects (often in range), so that a fair share of the trees is valid
TYPED_VALUES = {
    int: st.integers(min_value=-2, max_value=300),
    float: st.one_of(st.floats(min_value=-0.5, max_value=1.5), st.integers(min_value=0, max_value=2)),
    bool: st.booleans(),
    str: st.one_of(st.sampled_from(CHOICE_STRINGS), text_values),
    tuple[int, ...]: st.lists(st.integers(min_value=-1, max_value=300), max_size=3),
}
SECTION_TYPES = typing.get_type_hints(Config)
FIELD_TYPES = {
    (section, name): tp
    for section in SECTION_KEYS
    for name, tp in typing.get_type_hints(SECTION_TYPES[section]).items()
}
FIELD_CHOICES = {
    ("data", "name"): DATASETS,
    ("model", "activation"): ACTIVATION_NAMES,
    ("train", "dtype"): DTYPES,
    ("train", "loss"): LOSS_NAMES,
    ("optim", "name"): OPTIMIZER_NAMES,
}


def mostly(real: list[str], bogus: list[str]):
    """A key: three times in four a real one."""
    return st.one_of(st.sampled_from(real), st.sampled_from(real), st.sampled_from(real), st.sampled_from(bogus))


def value_for(section: str, name: str):
    if (section, name) in FIELD_CHOICES:
        typed = st.one_of(st.sampled_from(FIELD_CHOICES[section, name]), TYPED_VALUES[str])
    else:
        typed = TYPED_VALUES.get(FIELD_TYPES.get((section, name)))
    if typed is None:  # a bogus key
        return values
    return st.one_of(typed, typed, typed, values)


@st.composite
def config_trees(draw):
    tree = {}
    for key in draw(st.lists(mostly(TOP_KEYS, BOGUS_KEYS), unique=True, max_size=4)):
        if key in SECTION_KEYS and draw(st.integers(0, 4)):  # usually a proper table
            names = draw(st.lists(mostly(SECTION_KEYS[key], BOGUS_KEYS[:3]), unique=True, max_size=4))
            tree[key] = {name: draw(value_for(key, name)) for name in names}
        elif key == "seed" and draw(st.booleans()):
            tree[key] = draw(TYPED_VALUES[int])
        else:
            tree[key] = draw(values)
    return tree


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hypothesis_configs")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=config_trees())
def test_any_tree_gives_a_config_or_a_user_error(scratch, tree):
    path = scratch / "tree.toml"
    path.write_text(toml_document(tree), encoding="utf-8")
    try:
        cfg = load_config(str(path))
    except UserError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


override_keys = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + ["seed"]),
    st.sampled_from(TOP_KEYS + ["foo", "train.foo", "seed.x", "data.name.x", "a..b", ""]),
)
override_values = st.one_of(
    values.map(toml_value),
    text_values.filter(lambda s: "\n" not in s and "\r" not in s),
)


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(st.tuples(override_keys, override_values), max_size=4))
def test_any_override_gives_a_config_or_a_user_error(overrides):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides])
    except UserError:
        return
    assert isinstance(cfg, Config)


positive_floats = st.floats(min_value=0, exclude_min=True, allow_infinity=False)


# Any Unicode string, including characters outside the Basic Multilingual Plane and controls.
any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def valid_configs(draw):
    momentum = draw(st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1, exclude_max=True)))
    name = draw(st.sampled_from(DATASETS))
    return replace(
        Config(),
        seed=draw(st.integers(0, 2**63 - 1)),
        data={
            "name": name,
            "path": draw(any_text.filter(bool) if name in ("npz", "csv", "text", "images") else any_text),
            "target": draw(any_text.filter(bool) if name == "csv" else any_text),
            "val_fraction": draw(st.floats(min_value=0, max_value=1, exclude_max=True)),
            "shuffle": draw(st.booleans()),
            "n_samples": draw(st.integers(2, 10**4)),
            "n_features": draw(st.integers(1, 10**4)),
            "n_classes": draw(st.integers(2, 1000)),
        },
        model={"hidden": tuple(draw(st.lists(st.integers(1, 4096), max_size=4))),
               "activation": draw(st.sampled_from(ACTIVATION_NAMES))},
        train={"epochs": draw(st.integers(1, 10**6)), "batch_size": draw(st.integers(1, 10**6)),
               "dtype": draw(st.sampled_from(DTYPES)),
               "loss": "cross_entropy" if name in ("text", "images") else draw(st.sampled_from(LOSS_NAMES))},
        optim={"lr": draw(positive_floats), "momentum": momentum,
               "nesterov": draw(st.booleans()) and momentum > 0,
               "weight_decay": draw(st.floats(min_value=0, allow_infinity=False))},
        checkpoint={"every_steps": draw(st.integers(0, 10**6)), "every_epochs": draw(st.integers(0, 10**6)),
                    "keep": draw(st.integers(1, 100))},
    )


@settings(max_examples=200, deadline=None)
@given(cfg=valid_configs())
def test_valid_configs_round_trip(scratch, cfg):
    assert math.isfinite(cfg.optim.lr)
    assert config_from_dict(cfg.to_dict()) == cfg
    path = scratch / "round_trip.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(str(path)) == cfg


def test_to_toml_round_trips_any_unicode_and_control_characters(tmp_path):
    cfg = replace(Config(), data={"name": "npz", "path": "d/😀 \x7f\x01\"\\é.npz"})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override", ["optim.lr=" + "9" * 400, "seed=" + "1" * 5000])
def test_absurd_numbers_are_user_errors(override):
    with pytest.raises(UserError):
        load_config(None, [override])


def test_min_lr_is_checked_against_the_scaled_lr():
    """The cosine schedule decays from optim.lr x train.batch_size / optim.lr_reference_batch: a
    min_lr above that is refused by the config, in one line naming the key and the scaled value."""
    message = user_error(overrides=["optim.lr=0.1", "optim.min_lr=0.05", "optim.lr_reference_batch=256",
                                    "train.batch_size=64", "optim.schedule=cosine"])
    assert "optim.min_lr" in message and "0.025" in message and "\n" not in message, message


def test_config_and_optimizers_agree_on_eps():
    """One rule for eps, in (0, 1): the config refuses what the optimizers refuse, and the reverse."""
    from dptrain.optim import Adam, RMSprop

    for eps in (0.0, -1e-8, 1.0, 2.0, math.inf, math.nan):
        assert "optim.eps" in user_error(overrides=[f"optim.eps={eps}"])
        for cls in (Adam, RMSprop):
            with pytest.raises(ValueError, match="eps"):
                cls(np.zeros(3), np.zeros(3), eps=eps)
    for eps in (1e-12, 0.5):
        assert load_config(None, [f"optim.eps={eps}"]).optim.eps == eps


def test_build_schedule_turns_a_bad_schedule_into_a_user_error():
    """Defence in depth: a config that skipped validate (replace() does not check) still gives a
    UserError naming the key, not a bare ValueError."""
    from dptrain.app.build import build_schedule

    config = replace(load_config(None, ["optim.schedule=cosine"]), optim={"lr": 0.01, "min_lr": 0.05})
    with pytest.raises(UserError, match="optim.min_lr"):
        build_schedule(config, steps_per_epoch=10)
    config = replace(load_config(None, ["optim.schedule=step"]), optim={"gamma": 2.0})
    with pytest.raises(UserError, match="optim.gamma"):
        build_schedule(config, steps_per_epoch=10)
