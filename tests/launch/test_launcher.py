"""The launcher's argv and thread settings, without MPI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dptrain.errors import ExitQuietly, UserError
from dptrain.launch.mpiexec import build_command, find_mpiexec
from dptrain.parallel.comm import MPIComm, SingleProcessComm, launched_by_mpi, make_comm, refuse_under_mpi
from dptrain.runtime.threads import (
    THREAD_VARIABLES,
    bundled_with,
    describe_threads,
    thread_environment,
    thread_setup,
    threads_per_rank,
)

from helpers import subprocess_env


def test_argv_is_a_list_passed_verbatim():
    args = ["--out", "a b; rm -rf ~", "--set", "data.path=$(touch x)"]
    argv = build_command("/x/mpiexec", 4, args, python="/py")
    assert argv == ["/x/mpiexec", "-n", "4", "/py", "-m", "dptrain", "train", *args]


def test_argv_of_another_subcommand():
    argv = build_command("/x/mpiexec", 2, ["--json"], python="/py", subcommand="bench")
    assert argv == ["/x/mpiexec", "-n", "2", "/py", "-m", "dptrain", "bench", "--json"]


def test_ranks_must_be_positive():
    with pytest.raises(UserError):
        build_command("mpiexec", 0, [])


@pytest.mark.parametrize("ranks, cores, expected", [(1, 8, 8), (2, 8, 4), (3, 8, 2), (16, 8, 1)])
def test_threads_per_rank(ranks, cores, expected):
    assert threads_per_rank(ranks, cores=cores, environ={}) == expected


def test_slurm_cpus_per_task_wins():
    assert threads_per_rank(4, cores=64, environ={"SLURM_CPUS_PER_TASK": "3"}) == 3


def test_user_thread_settings_are_respected():
    assert thread_environment(2, environ={"OMP_NUM_THREADS": "5"}, cores=8) == {}
    env = thread_environment(2, environ={}, cores=8)
    assert env == {v: "4" for v in THREAD_VARIABLES}


def test_what_set_the_threads_is_worded_once():
    assert describe_threads(2, environ={"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "3"}) == \
        "set by OMP_NUM_THREADS=5, MKL_NUM_THREADS=3"
    assert describe_threads(None, environ={"OMP_NUM_THREADS": "5"}) == "set by OMP_NUM_THREADS=5"
    assert describe_threads(None, environ={}) == "the BLAS's default: dptrain sets none for a single process"
    assert describe_threads(3, environ={}, cores=8) == "dptrain: max(1, 8 cores / 3 ranks per node)"
    assert describe_threads(4, environ={"SLURM_CPUS_PER_TASK": "3"}) == "dptrain: SLURM_CPUS_PER_TASK=3"
    assert describe_threads(4, environ={"PBS_JOBID": "1.s", "NCPUS": "16"}) == \
        "dptrain: max(1, NCPUS=16 (PBS) / 4 ranks per node)"


def test_thread_setup_names_the_real_source():
    assert thread_setup(2, environ={"SLURM_CPUS_PER_TASK": "3"}, cores=64) == \
        ({v: "3" for v in THREAD_VARIABLES}, "dptrain: SLURM_CPUS_PER_TASK=3")
    assert thread_setup(2, environ={}, cores=8) == ({v: "4" for v in THREAD_VARIABLES},
                                                     "dptrain: max(1, 8 cores / 2 ranks per node)")
    assert thread_setup(2, environ={"OPENBLAS_NUM_THREADS": "2"}, cores=8) == ({}, "set by OPENBLAS_NUM_THREADS=2")


@pytest.mark.parametrize("path, expected", [
    ("/v/lib/python3.11/site-packages/scipy.libs/libscipy_openblas-6cdc3b4a.so", "scipy"),
    ("/v/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so", "numpy"),
    ("/v/lib/python3.11/site-packages/scipy/.dylibs/libopenblas.0.dylib", "scipy"),
    ("C:\\v\\Lib\\site-packages\\numpy.libs\\libopenblas.dll", "numpy"),
    ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", None),
    ("/opt/scipy/lib/libopenblas.so", None),  # a folder named scipy, not a wheel's bundle
    ("", None),
])
def test_bundled_with(path, expected):
    assert bundled_with(path) == expected


THREAD_CAP_SCRIPT = textwrap.dedent("""
    import scipy.linalg.blas
    from threadpoolctl import threadpool_info
    from dptrain.runtime.threads import bundled_with, limit_threads_in_process

    before = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
    assert limit_threads_in_process(10**6) == 1
    for i in threadpool_info():
        scipys_own = bundled_with(i["filepath"]) == "scipy"
        assert i["num_threads"] == (before[i["filepath"]] if scipys_own else 1), (i, before)
        print("scipy" if scipys_own else "other", i["num_threads"])
""")


def test_the_thread_cap_leaves_scipys_own_blas_to_the_optimizers():
    env = subprocess_env(**{v: "" for v in THREAD_VARIABLES})
    result = subprocess.run([sys.executable, "-c", THREAD_CAP_SCRIPT], capture_output=True, text=True, env=env,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "other 1" in result.stdout.splitlines()


def test_make_comm_honours_dptrain_comm(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")  # as if under mpiexec: "auto" alone would choose MPI
    monkeypatch.setenv("DPTRAIN_COMM", "single")
    assert isinstance(make_comm(), SingleProcessComm)
    assert isinstance(make_comm("auto"), SingleProcessComm)  # the CLI's --comm default defers to it
    assert make_comm("auto").thread_limit is None
    monkeypatch.setenv("DPTRAIN_COMM", "bogus")
    with pytest.raises(UserError, match=r"^DPTRAIN_COMM=bogus: unknown communicator: expected auto, mpi or single$"):
        make_comm("auto")
    assert isinstance(make_comm("single"), SingleProcessComm)  # an explicit --comm wins
    with pytest.raises(UserError, match=r"^unknown communicator 'nope': expected auto, mpi or single$"):
        make_comm("nope")


def test_thread_limit_is_none_until_make_comm_caps():
    assert SingleProcessComm.thread_limit is None and MPIComm.thread_limit is None


def test_refuse_under_mpi(monkeypatch, capsys):
    monkeypatch.delenv("DPTRAIN_COMM", raising=False)
    for v in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(v, raising=False)
    assert refuse_under_mpi("not here") is None
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(ExitQuietly) as caught:
        refuse_under_mpi("not here", "single")  # a one-process "world": it prints as rank 0 would
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: not here\n"


def test_find_mpiexec_prefers_the_explicit_one():
    assert find_mpiexec(sys.executable, environ={}) == sys.executable
    assert find_mpiexec(None, environ={"DPTRAIN_MPIRUN": sys.executable}) == sys.executable
    with pytest.raises(UserError, match="not found"):
        find_mpiexec("/no/such/mpiexec", environ={})


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}, False),  # the batch script itself, not an srun task
    ({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}, True),
])
def test_mpi_detection(env, expected):
    assert launched_by_mpi(env) is expected


def test_pbs_ncpus_is_shared_by_the_ranks_of_the_node():
    assert threads_per_rank(4, environ={"PBS_JOBID": "1.server", "NCPUS": "16"}) == 4
    assert threads_per_rank(4, cores=32, environ={"NCPUS": "16"}) == 8  # not a PBS job: ignored
