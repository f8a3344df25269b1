"""The launcher's argv and thread settings, without MPI."""

from __future__ import annotations

import sys

import pytest

from dptrain.comm import launched_by_mpi
from dptrain.errors import UserError
from dptrain.launcher import THREAD_VARIABLES, build_command, find_mpiexec, thread_environment, threads_per_rank


def test_argv_is_a_list_passed_verbatim():
    args = ["--out", "a b; rm -rf ~", "--set", "data.path=$(touch x)"]
    argv = build_command("/x/mpiexec", 4, args, python="/py")
    assert argv == ["/x/mpiexec", "-n", "4", "/py", "-m", "dptrain", "train", *args]


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
