"""`dptrain info`, `dptrain config show|validate`, and warnings printed once per rank under MPI."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from dptrain.config import load_config
from dptrain.runtime import rank_warnings, sysinfo
from dptrain.runtime.threads import thread_choice

from helpers import MPIEXEC, REPO, dptrain, invoke, needs_mpiexec, run

NO_THREAD_VARIABLES = {v: None for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                         "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


# ---------------------------------------------------------------------------------------------
# dptrain info


def test_info_single_process():
    result = invoke("info", env={**NO_THREAD_VARIABLES, "OMP_NUM_THREADS": "1"})
    assert result.exit_code == 0, result.output
    rows = dict(line.split(None, 1) for line in result.output.splitlines() if not line.startswith(" "))
    assert rows["dptrain"].startswith("0.")
    assert rows["NumPy"] == __import__("numpy").__version__
    # the library mpi4py is built against, named before a job starts (is it the site's MPI?)
    from mpi4py import __version__ as mpi4py_version  # noqa: F401 (installed with dptrain[mpi])
    assert rows["MPI"].startswith("not under MPI (single process); mpi4py is built against "), rows["MPI"]
    assert "MPICH" in rows["MPI"] or "Open MPI" in rows["MPI"] or "Intel" in rows["MPI"], rows["MPI"]
    assert rows["threads"].endswith(" per rank (set by OMP_NUM_THREADS=1)")  # the count: the BLAS's, read
    assert ".so" in rows["BLAS"] or ".dylib" in rows["BLAS"] or ".dll" in rows["BLAS"]
    assert "cores available" in rows["CPU"]


def test_info_json():
    result = invoke("info", "--json", env=NO_THREAD_VARIABLES)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["python"]["executable"] == sys.executable
    library = report["mpi"].pop("mpi4py_library")
    assert report["mpi"] == {"under_mpi": False, "library": None, "world_size": 1, "nodes": 1, "ranks_per_node": 1,
                             "ranks_per_host": {report["hostname"]: 1}}
    assert library and "Version" in library
    keys = {"internal_api", "version", "filename", "architecture", "num_threads"}
    assert report["blas"] and keys <= set(report["blas"][0])
    assert report["threads_set_by"].startswith("the BLAS's default")
    assert report["cpu"]["cores"] >= 1
    # a BLAS SciPy bundles for itself: on the one thread the optimizers give it, as in training
    assert all(b["num_threads"] == 1 for b in report["blas"] if b["bundled_with"] == "scipy")
    assert report["blas"][0]["bundled_with"] != "scipy"  # NumPy's first: the count above is read from it


def test_every_command_honours_dptrain_comm():
    for args in (["info"], ["config", "show"], ["config", "validate"], ["model", "summary"]):
        result = invoke(*args, env={"DPTRAIN_COMM": "bogus"})
        assert result.exit_code == 2, args
        assert result.stderr == "error: DPTRAIN_COMM=bogus: unknown communicator: expected auto, mpi or single\n"
    for args in (["info"], ["config", "show"], ["config", "validate"]):  # an explicit --comm wins
        result = invoke(*args, "--comm", "single", env={"DPTRAIN_COMM": "bogus"})
        assert result.exit_code == 0, (args, result.output)


def test_info_says_when_mpi4py_is_missing(monkeypatch):
    monkeypatch.setattr(sysinfo, "package_version", lambda name: None)
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert "mpi4py   not installed" in result.output


def test_thread_choice_names_its_source():
    assert thread_choice(4, cores=64, environ={"SLURM_CPUS_PER_TASK": "3"}) == (3, "SLURM_CPUS_PER_TASK=3")
    pbs = {"PBS_JOBID": "1.s", "NCPUS": "16"}
    assert thread_choice(4, environ=pbs) == (4, "max(1, NCPUS=16 (PBS) / 4 ranks per node)")
    assert thread_choice(3, cores=8, environ={}) == (2, "max(1, 8 cores / 3 ranks per node)")
    assert thread_choice(1, cores=8, environ={}) == (8, "max(1, 8 cores / 1 rank per node)")


@needs_mpiexec
def test_info_under_mpi_is_printed_once_and_counts_the_nodes():
    result = dptrain("info", ranks=2, OMP_NUM_THREADS="", OPENBLAS_NUM_THREADS="", MKL_NUM_THREADS="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dptrain  ") == 1
    mpi = next(line for line in result.stdout.splitlines() if line.startswith("MPI "))
    assert mpi.endswith("; 2 ranks on 1 node, 2 ranks per node")
    threads = next(line for line in result.stdout.splitlines() if line.startswith("threads "))
    assert "per rank (dptrain: max(1, " in threads and "/ 2 ranks per node)" in threads

    result = dptrain("info", "--json", ranks=2)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one object: rank 0's
    assert report["mpi"]["under_mpi"] and report["mpi"]["world_size"] == 2 and report["mpi"]["nodes"] == 1
    assert report["mpi"]["ranks_per_node"] == 2 and list(report["mpi"]["ranks_per_host"].values()) == [2]
    assert report["mpi"]["library"]


# ---------------------------------------------------------------------------------------------
# dptrain config show | validate


@pytest.mark.parametrize("config, overrides", [
    (None, []),
    (str(REPO / "configs" / "digits_mlp.toml"), ["--set", "model.hidden=[32, 16]", "--set", "optim.eps=1e-300"]),
    (str(REPO / "configs" / "digits_cnn.toml"),
     ["--set", 'data.path="a \\"quoted\\" \\\\ path\\twith ünïcode"', "--set", "train.epochs=3"]),
    (None, ["--set", "data.shape=[1, 8, 8]", "--set",
            'model.layers=[{type = "conv2d", filters = 4, kernel = [3, 2], padding = [1, 0]}, {type = "relu"}, '
            '{type = "avgpool2d", pool = [2, 1]}, {type = "flatten"}, {type = "dense", units = 8, init = "xavier"}]']),
])
def test_config_show_round_trips_through_validate(tmp_path, config, overrides):
    args = (["--config", config] if config else []) + overrides
    shown = invoke("config", "show", *args)
    assert shown.exit_code == 0, shown.output
    path = tmp_path / "resolved.toml"
    path.write_text(shown.output)
    assert load_config(str(path)) == load_config(config, overrides[1::2])
    validated = invoke("config", "validate", "--config", str(path))
    assert validated.exit_code == 0, validated.output
    assert validated.output.startswith("config OK: data ")
    again = invoke("config", "show", "--config", str(path))  # a fixed point
    assert again.output == shown.output


@needs_mpiexec
def test_config_validate_under_mpi_checks_for_the_job_and_prints_once():
    result = dptrain("config", "validate", ranks=2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("config OK") == 1 and "(global batch 64, 2 ranks)" in result.stdout
    result = dptrain("config", "validate", "--set", "train.epochs=0", ranks=2)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("train.epochs must be >= 1") == 1


def test_config_show_has_model_layers_and_data_shape():
    shown = invoke("config", "show", "--config", str(REPO / "configs" / "digits_cnn.toml"))
    assert "shape = [1, 8, 8]" in shown.output
    assert 'layers = [{type = "conv2d", filters = 16, kernel = 3, padding = 1, bias = false}, ' in shown.output


def test_config_validate_summary():
    result = invoke("config", "validate", "--config", str(REPO / "configs" / "digits_mlp.toml"), "-n", "4")
    assert result.exit_code == 0, result.output
    assert result.output == ("config OK: data digits: 1438 training / 359 validation samples; MLP 64-128-10 relu, "
                             "9,610 parameters; cross_entropy, sgd lr 0.05, 30 epochs of 23 steps (global batch 64, "
                             "4 ranks), float32\n")
    result = invoke("config", "validate", "--config", str(REPO / "configs" / "digits_cnn.toml"))
    assert result.exit_code == 0, result.output
    assert " samples; 12 layers from 1x8x8 to 10 outputs, " in result.output  # not an MLP: no bare layer chain


@pytest.mark.parametrize("args, message", [
    (["--set", "train.epochs=0"], "train.epochs must be >= 1"),
    (["--set", "nope=1"], "unknown key nope"),
    (["--config", "missing.toml"], "config missing.toml: not found"),
    (["--set", "data.shape=[2, 8, 8]"], "data.shape = [2, 8, 8] holds 128 values"),  # needs the data
    (["--set", "data.shape=[1, 8, 8]", "--set", 'model.layers=[{type = "maxpool2d", pool = 9}]'],
     "model.layers[0]"),  # a window larger than the image: needs the data's shape
    (["--set", "data.name=npz", "--set", "data.path=nothing.npz"], "nothing.npz"),
    (["-n", "2000"], "1438 training samples for 2000 ranks"),
    (["-n", "0"], "--ranks 0: must be >= 1"),
])
def test_config_validate_refuses_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke("config", "validate", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def test_config_show_refuses_bad_input():
    result = invoke("config", "show", "--set", "optim.lr=-1")
    assert result.exit_code == 2 and result.stdout == ""
    assert "optim.lr" in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Warnings: once per rank, "[rank r] " on r > 0


def test_rank_warnings_in_process(monkeypatch, capsys):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    hook = rank_warnings.install(1)
    assert rank_warnings.install(1) is hook and warnings.showwarning is hook
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("a repeated warning", UserWarning, stacklevel=2)
        warnings.warn("another one", RuntimeWarning, stacklevel=2)
    err = capsys.readouterr().err
    assert err.count("UserWarning: a repeated warning") == 1 and err.count("RuntimeWarning: another one") == 1
    assert err.splitlines() and all(line.startswith("[rank 1] ") for line in err.splitlines())

    shown = []  # rank 0: through the showwarning it replaced, once each
    rank0 = rank_warnings.RankWarnings(0, lambda *args: shown.append(args))
    for _ in range(3):
        rank0("a repeated warning", UserWarning, "x.py", 7)
    rank0("a repeated warning", UserWarning, "x.py", 8)  # another location
    assert [args[3] for args in shown] == [7, 8]
    assert capsys.readouterr().err == ""


WARNING_SCRIPT = """
import warnings
from dptrain.parallel.comm import make_comm

comm = make_comm("mpi")
warnings.simplefilter("always")  # Python's own filter alone would not repeat it either
for _ in range(2):
    warnings.warn("the same warning on every rank", UserWarning)
comm.barrier()
"""


@needs_mpiexec
def test_warnings_under_mpi_appear_once_per_rank_prefixed(tmp_path):
    script = tmp_path / "warn.py"
    script.write_text(WARNING_SCRIPT)
    result = run([MPIEXEC, "-n", "2", sys.executable, str(script)])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "UserWarning: the same warning on every rank" in line]
    assert len(lines) == 2, result.stderr
    assert sum(line.startswith(f"{script}:") for line in lines) == 1  # rank 0's, as Python prints it
    assert sum(line.startswith(f"[rank 1] {script}:") for line in lines) == 1
    assert result.stderr.count('warnings.warn("the same warning on every rank", UserWarning)') == 2  # its source line
