"""`dptrain launch --scheduler slurm|pbs`: the batch script made from launch/, run with stub
launchers, and submitted with a stand-in sbatch/qsub placed first on PATH.

No scheduler is needed: a generated script is run with bash and the variables Slurm or PBS would
set, as tests/test_launch_scripts.py does with the templates themselves.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.launch.jobscript import BatchJob, find_template, parse_job_id, parse_time, render

from helpers import REPO, dptrain, needs_mpiexec

CONFIG = str(REPO / "configs" / "digits_mlp.toml")
SLURM_ARGS = ["--scheduler", "slurm", "--nodes", "2", "--ranks-per-node", "4", "--time", "01:00:00"]
PBS_ARGS = ["--scheduler", "pbs", "--nodes", "3", "--ranks-per-node", "8", "--time", "12:30:00"]
WEIRD = "a  b;$(touch pwned);`touch pwned2`|* 'q' \"dq\"\nsecond line"
TIMEOUT = 60


def invoke(args: list[str], env: dict[str, str | None] | None = None):
    return CliRunner(env=env).invoke(main, ["launch", *args], catch_exceptions=False)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _recorder(stub_dir: Path, name: str, log: Path, stdout: str = "", exit_code: int = 0) -> Path:
    """A stand-in for srun/mpiexec/sbatch/qsub: records its argv (NUL-separated) and the DPTRAIN_
    variables it sees, prints stdout, exits with exit_code."""
    stub_dir.mkdir(exist_ok=True)
    return _executable(stub_dir / name, f"""#!/bin/bash
printf '%s\\0' "$@" > '{log}'
env | grep '^DPTRAIN_' > '{log}.env' || true
printf '%s' {shlex.quote(stdout)}
exit {exit_code}
""")


def _argv(log: Path) -> list[str]:
    return log.read_text().split("\0")[:-1]


def _job_env(stub_dir: Path, **extra: str) -> dict[str, str]:
    """The test's environment without scheduler, MPI or DPTRAIN_ variables; stub_dir first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "PBS_", "PMI_", "PMIX_", "OMPI_", "DPTRAIN_"))}
    env["PATH"] = os.pathsep.join([str(stub_dir), str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env.update(extra)
    return env


def _generate(args: list[str], cwd: Path, monkeypatch, expected_note: str = "") -> str:
    monkeypatch.chdir(cwd)
    result = invoke([*args, "--print"])
    assert result.exit_code == 0, result.output
    assert result.stderr == expected_note
    return result.stdout


# ---------------------------------------------------------------------------------------------
# The script's text


def test_slurm_script_has_the_resources_the_arguments_and_the_templates_preemption_logic(tmp_path, monkeypatch):
    text = _generate([*SLURM_ARGS, "--job-name", "digits", "--config", CONFIG, "--out", "runs/x y",
                      "--set", f"data.path={WEIRD}", "--set", "train.epochs=3"], tmp_path, monkeypatch)
    lines = text.splitlines()
    for line in ("#SBATCH --job-name=digits", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --time=01:00:00"):
        assert lines.count(line) == 1, line
    assert "#SBATCH --nodes=1" not in lines and "#SBATCH --job-name=dptrain" not in lines
    template = (REPO / "launch" / "slurm.sbatch").read_text()
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --cpus-per-task=1",
                 "trap 'relay USR1' USR1", "trap 'relay TERM' TERM",
                 "requeue_words=${DPTRAIN_REQUEUE_CMD:-scontrol requeue}", 'if ! "${requeue[@]}" "$SLURM_JOB_ID"; then',
                 'cmd+=(--out "$out" --resume auto "$@")'):
        assert line in template and line in lines, line
    # Every template line is still there, apart from the four resource lines.
    changed = {"#SBATCH --job-name=dptrain", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4",
               "#SBATCH --time=01:00:00"}
    assert [x for x in template.splitlines() if x not in changed and x not in lines] == []
    assert f"    DPTRAIN_CONFIG={shlex.quote(CONFIG)}" in lines
    assert "    DPTRAIN_OUT='runs/x y'" in lines
    assert f"    DPTRAIN_PYTHON={shlex.quote(sys.executable)}" in lines  # the same installation runs the job
    assert f'set -- --set {shlex.quote("data.path=" + WEIRD)} --set train.epochs=3 "$@"' in text
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stderr
    assert not list(tmp_path.iterdir())  # --print writes nothing


def test_pbs_script_has_the_resources_and_the_templates_resubmission_logic(tmp_path, monkeypatch):
    note = ("note: after a checkpoint the job resubmits $DPTRAIN_PBS_SCRIPT [the pbs.sh template]; give --script-out FILE "
            "so that it resubmits this script\n")
    text = _generate([*PBS_ARGS, "--config", CONFIG, "--set", "train.epochs=3"], tmp_path, monkeypatch, note)
    lines = text.splitlines()
    for line in ("#PBS -N dptrain", "#PBS -l select=3:ncpus=8:mpiprocs=8", "#PBS -l walltime=12:30:00",
                 "#PBS -r y", "#PBS -j oe", "trap 'on_signal TERM' TERM",
                 'if ! "${requeue[@]}" -v "$variables" "$script"; then'):
        assert lines.count(line) == 1, line
    assert "#PBS -l select=1:ncpus=4:mpiprocs=4" not in lines
    assert "    DPTRAIN_PBS_SCRIPT=" not in text  # no file to resubmit: the template's default
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stderr


def test_script_out_writes_an_executable_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "jobs" / "a b.sbatch"
    result = invoke([*SLURM_ARGS, "--script-out", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"wrote {path}" in result.stderr
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], timeout=TIMEOUT).returncode == 0
    # No --config: DPTRAIN_CONFIG empty, the built-in default.
    assert "if [[ -z \"${DPTRAIN_CONFIG+set}\" ]]; then\n    DPTRAIN_CONFIG=''\nfi" in path.read_text()


# ---------------------------------------------------------------------------------------------
# The script at work, with stub launchers


def test_slurm_job_runs_dptrain_train_with_the_arguments_verbatim(tmp_path, monkeypatch):
    script = tmp_path / "job.sbatch"
    monkeypatch.chdir(tmp_path)
    out = "runs/$(touch pwned3) x"
    result = invoke([*SLURM_ARGS, "--script-out", str(script), "--config", CONFIG, "--out", out,
                     "--comm", "mpi", "--quiet", "--set", f"data.path={WEIRD}"])
    assert result.exit_code == 0, result.output
    stubs, log = tmp_path / "stubs", tmp_path / "argv"
    _recorder(stubs, "srun", log, exit_code=0)
    env = _job_env(stubs, SLURM_JOB_ID="4242", SLURM_NTASKS="8")
    job = subprocess.run(["bash", str(script), "--set", "train.epochs=7"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert _argv(log) == [sys.executable, "-m", "dptrain", "train", "--config", CONFIG, "--out", out,
                          "--resume", "auto", "--set", f"data.path={WEIRD}", "--quiet", "--comm", "mpi",
                          "--set", "train.epochs=7"]  # the train options (in their declared order), then the script's
    assert not list(tmp_path.rglob("pwned*"))

    # The job's environment wins, as with the template.
    job = subprocess.run(["bash", str(script)], env={**env, "DPTRAIN_OUT": "elsewhere", "DPTRAIN_CONFIG": ""},
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert _argv(log)[3:7] == ["train", "--out", "elsewhere", "--resume"]


def test_slurm_job_requeues_itself_on_exit_75(tmp_path, monkeypatch):
    script = tmp_path / "job.sbatch"
    monkeypatch.chdir(tmp_path)
    assert invoke([*SLURM_ARGS, "--script-out", str(script)]).exit_code == 0
    stubs = tmp_path / "stubs"
    _recorder(stubs, "srun", tmp_path / "argv", exit_code=75)
    requeue = _recorder(stubs, "requeue", tmp_path / "requeued")
    env = _job_env(stubs, SLURM_JOB_ID="4242", DPTRAIN_REQUEUE_CMD=str(requeue))
    job = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert _argv(tmp_path / "requeued") == ["4242"]
    assert "--out runs/slurm-4242 --resume auto" in " ".join(_argv(tmp_path / "argv"))  # the template's default


def test_pbs_job_resubmits_itself_with_the_run_folder(tmp_path, monkeypatch):
    script = tmp_path / "job dir" / "job.sh"
    monkeypatch.chdir(tmp_path)
    result = invoke([*PBS_ARGS, "--script-out", str(script), "--config", CONFIG, "--out", "runs/p",
                     "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    stubs = tmp_path / "stubs"
    launcher = _recorder(stubs, "mpiexec", tmp_path / "argv", exit_code=75)
    qsub = _recorder(stubs, "qsub", tmp_path / "resubmitted")
    (tmp_path / "runs" / "p").mkdir(parents=True)
    (tmp_path / "runs" / "p" / "config.toml").write_text("")  # the run's resolved config
    env = _job_env(stubs, PBS_JOBID="77.server", PBS_O_WORKDIR=str(tmp_path), DPTRAIN_NP="24",
                   DPTRAIN_MPIRUN=str(launcher), DPTRAIN_HOSTFILE_FLAG="")
    job = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert _argv(tmp_path / "argv") == ["-n", "24", sys.executable, "-m", "dptrain", "train", "--config", CONFIG,
                                        "--out", "runs/p", "--resume", "auto", "--set", "train.epochs=3"]
    argv = _argv(qsub.parent.parent / "resubmitted")
    assert argv[0] == "-v" and argv[-1] == str(script)  # this script, not launch/pbs.sh
    assert argv[1].startswith("DPTRAIN_CONFIG=runs/p/config.toml,DPTRAIN_OUT=runs/p,")
    assert f"DPTRAIN_PBS_SCRIPT={script}" in argv[1]

    # The continuation job: qsub -v sets DPTRAIN_CONFIG and DPTRAIN_OUT, which win over the script's.
    env.update(DPTRAIN_CONFIG="runs/p/config.toml", DPTRAIN_OUT="runs/p")
    job = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert _argv(tmp_path / "argv")[6:] == ["--config", "runs/p/config.toml", "--out", "runs/p", "--resume", "auto",
                                            "--set", "train.epochs=3"]


# ---------------------------------------------------------------------------------------------
# Submitting


@pytest.mark.parametrize("scheduler, args, submitter, printed, job_id", [
    ("slurm", SLURM_ARGS, "sbatch", "Submitted batch job 123\n", "123"),
    ("pbs", PBS_ARGS, "qsub", "4242.pbsserver\n", "4242.pbsserver"),
])
def test_submit_with_a_stand_in_scheduler(tmp_path, monkeypatch, scheduler, args, submitter, printed, job_id):
    monkeypatch.chdir(tmp_path)
    stubs, log = tmp_path / "stubs", tmp_path / "submitted"
    _recorder(stubs, submitter, log, stdout=printed)
    env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "DPTRAIN_CONFIG": "stray.toml", "DPTRAIN_OUT": "stray"}
    result = invoke([*args, "--submit", "--config", CONFIG, "--out", "runs/s"], env=env)
    assert result.exit_code == 0, result.output
    scripts = [p.relative_to(tmp_path) for p in (tmp_path / "runs" / "jobs").iterdir()]  # the default --script-out
    assert len(scripts) == 1 and scripts[0].name.startswith("dptrain-")
    assert _argv(log) == [str(scripts[0])]
    assert result.stdout == f"submitted {scheduler} job {job_id} ({scripts[0]})\n"
    assert "DPTRAIN_" not in (tmp_path / "submitted.env").read_text()  # strays kept out of what sbatch exports
    assert f"DPTRAIN_CONFIG={shlex.quote(CONFIG)}" in scripts[0].read_text()
    assert not (tmp_path / "runs" / "s").exists()  # the job makes its run folder, not the submission


def test_submit_writes_script_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stubs = tmp_path / "stubs"
    _recorder(stubs, "sbatch", tmp_path / "submitted", stdout="Submitted batch job 9\n")
    result = invoke([*SLURM_ARGS, "--submit", "--script-out", "mine.sbatch"],
                    env={"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"})
    assert result.exit_code == 0, result.output
    assert _argv(tmp_path / "submitted") == ["mine.sbatch"]
    assert "submitted slurm job 9" in result.stdout


def test_submit_without_sbatch_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = invoke([*SLURM_ARGS, "--submit"], env={"PATH": str(empty)})
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "sbatch not found" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["empty-bin"]


def test_a_failing_sbatch_is_reported_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _executable(stubs / "sbatch", "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                  "exit 1\n")
    result = invoke([*SLURM_ARGS, "--submit"], env={"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"})
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith("error: sbatch ")
    assert "failed with exit status 1: sbatch: error: Batch job submission failed: Invalid account" in result.stderr


@pytest.mark.skipif(any(os.access(Path(d) / "sbatch", os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="a real sbatch is on PATH")
def test_print_needs_no_scheduler(tmp_path, monkeypatch):
    text = _generate(SLURM_ARGS, tmp_path, monkeypatch)
    assert text.startswith("#!/bin/bash\n# Generated by `dptrain launch --scheduler slurm`")


def test_job_ids():
    assert parse_job_id("slurm", "Submitted batch job 123\n", "sbatch") == "123"
    assert parse_job_id("slurm", "123;cluster\n", "sbatch") == "123"
    assert parse_job_id("pbs", "\n1234.server\n", "qsub") == "1234.server"
    with pytest.raises(UserError, match="no job id"):
        parse_job_id("pbs", "\n", "qsub")


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "lsf", "--nodes", "1", "--ranks-per-node", "1", "--time", "01:00:00"], "--scheduler lsf"),
    ([*SLURM_ARGS[:2], "--nodes", "0", *SLURM_ARGS[4:]], "--nodes 0: must be >= 1"),
    ([*SLURM_ARGS[:2], "--nodes", "two", *SLURM_ARGS[4:]], "--nodes two: expected an integer >= 1"),
    ([*SLURM_ARGS[:4], "--ranks-per-node", "-1", *SLURM_ARGS[6:]], "--ranks-per-node -1: must be >= 1"),
    ([*SLURM_ARGS[:6], "--time", "1:00"], "--time 1:00: expected HH:MM:SS"),
    ([*SLURM_ARGS[:6], "--time", "01:60:00"], "--time 01:60:00: expected HH:MM:SS"),
    ([*SLURM_ARGS[:6], "--time", "00:00:00"], "--time 00:00:00: must be longer than 0"),
    ([*SLURM_ARGS[:6], "--time", "00:02:00"], "--time 00:02:00: must be longer than the 120 s"),
    (SLURM_ARGS[:6], "--time is required"),
    ([*SLURM_ARGS, "--job-name", "my job"], "--job-name my job"),
    ([*SLURM_ARGS, "-n", "4"], "-n 4 and --scheduler slurm: choose one"),
    (["-n", "4", "--nodes", "2"], "--nodes: only with --scheduler"),
    (["--config", CONFIG], "give -n N"),
    ([*SLURM_ARGS, "--dry-run"], "--dry-run: only with -n"),
    ([*SLURM_ARGS, "--print", "--submit"], "--print and --submit: choose one"),
    ([*SLURM_ARGS, "--overwrite"], "--overwrite: not with --scheduler"),
    ([*SLURM_ARGS, "--resume", "runs/x/checkpoints/latest"], "--resume runs/x/checkpoints/latest: not with"),
    ([*SLURM_ARGS, "--set", "train.epochs=0"], "train.epochs must be >= 1"),
    ([*SLURM_ARGS, "--no-such-option"], "no-such-option"),
    ([*SLURM_ARGS, "--config", "missing.toml"], "config missing.toml: not found"),
    ([*SLURM_ARGS, "--template", "missing.sbatch"], "--template missing.sbatch: not found"),
])
def test_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke([*args, "--script-out", "job.sh"] if "--script-out" not in args else args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_template_without_a_resource_line_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = tmp_path / "site.sbatch"
    template.write_text((REPO / "launch" / "slurm.sbatch").read_text().replace("#SBATCH --time=01:00:00\n", ""))
    result = invoke([*SLURM_ARGS, "--template", str(template), "--script-out", "job.sh"])
    assert result.exit_code == 2
    assert "expected one line starting with '#SBATCH --time=', found 0" in result.stderr
    assert not (tmp_path / "job.sh").exists()


def test_render_and_time_directly():
    assert parse_time("48:00:00") == 48 * 3600
    job = BatchJob("pbs", 1, 2, "00:10:00", script_path="/jobs/it's.sh")
    text = render(find_template("pbs").read_text(), job, "site\nrm -rf x.sh")  # a name cannot end the comment
    assert "    DPTRAIN_PBS_SCRIPT='/jobs/it'\"'\"'s.sh'" in text
    assert "\n# rm -rf x.sh: 1 node(s) x 2 rank(s)" in text


def test_plain_launch_is_unchanged():
    result = CliRunner(env={"OMP_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None, "MKL_NUM_THREADS": None}).invoke(
        main, ["launch", "-n", "2", "--mpirun", sys.executable, "--dry-run", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert f"-n 2 {sys.executable} -m dptrain train --set train.epochs=1" in result.output


@needs_mpiexec
def test_a_batch_job_is_refused_under_mpirun_in_one_line(tmp_path):
    result = dptrain("launch", *SLURM_ARGS, "--script-out", str(tmp_path / "job.sh"), ranks=2, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: launch: run it outside mpirun/mpiexec/srun: it starts or submits the ranks itself\n"
    assert not list(tmp_path.iterdir())
