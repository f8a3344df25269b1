"""Built-in configs: shipped inside the package, found by name (--config digits_cnn), listed by
`dptrain config list`; the repository's configs/ and launch/ are the package's files, not copies."""

from __future__ import annotations

from click.testing import CliRunner

from dptrain.cli import main
from dptrain.config import builtin_configs, load_config

from helpers import REPO


def test_configs_and_launch_folders_are_the_packages_files():
    assert (REPO / "configs").resolve() == (REPO / "dptrain" / "config" / "builtin").resolve()
    assert (REPO / "launch").resolve() == (REPO / "dptrain" / "launch" / "templates").resolve()
    assert sorted(p.name for p in (REPO / "configs").glob("*.toml")) == [f"{n}.toml" for n in builtin_configs()]


def test_a_builtin_name_loads_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the source tree: no configs/ folder here
    for name in builtin_configs():
        expected = load_config(str(REPO / "configs" / f"{name}.toml"))
        assert load_config(name) == expected
        assert load_config(f"{name}.toml") == expected


def test_a_file_of_that_name_wins_over_the_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_cnn.toml").write_text("[train]\nepochs = 2\n")
    assert load_config("digits_cnn.toml").train.epochs == 2
    assert load_config("digits_cnn").train.epochs == 30  # no file named digits_cnn here: the built-in one


def test_config_list_names_each_builtin_with_its_summary():
    result = CliRunner().invoke(main, ["config", "list"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == ["bench_cnn", "bench_resnet", "diabetes_mlp", "digits_cnn",
                                                   "digits_images", "digits_mlp", "digits_resnet", "mnist1d_cnn", "mnist1d_gru",
                                                   "mnist1d_logreg", "mnist1d_mlp", "shakespeare_char"]
    assert "A small CNN" in lines[3]


def test_train_with_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--config", "digits_mlp", "--set", "train.epochs=1", "--quiet",
                                       "--out", "run"])
    assert result.exit_code == 0, result.output
    assert "checkpoint run/checkpoints/step-" in result.output


def test_an_unknown_name_lists_the_builtins():
    result = CliRunner().invoke(main, ["config", "show", "--config", "digits_rnn"])
    assert result.exit_code == 2
    assert result.output == ("error: config digits_rnn: not found (nor a built-in config: bench_cnn, bench_resnet, "
                             "diabetes_mlp, digits_cnn, digits_images, digits_mlp, digits_resnet, mnist1d_cnn, mnist1d_gru, "
                             "mnist1d_logreg, mnist1d_mlp, shakespeare_char)\n")


def test_a_folder_of_that_name_does_not_hide_the_builtin(tmp_path, monkeypatch):
    """examples/digits_to_images.py writes its images into a folder named like the config that reads them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_images").mkdir()
    assert load_config("digits_images").data.name == "images"
