"""Slurm and PBS batch scripts for ``dptrain launch --scheduler``, made from the templates in ``templates/``.

A generated script is its template's text with two changes, so that all of the template's
preemption and requeue handling stays as it is:

* the resource lines are replaced: ``#SBATCH --job-name= / --nodes= / --ntasks-per-node= / --time=``,
  or ``#PBS -N / -l select=N:ncpus=K:mpiprocs=K / -l walltime=``;
* a block is inserted before the template reads ``DPTRAIN_CONFIG``: it sets ``DPTRAIN_CONFIG``,
  ``DPTRAIN_OUT``, ``DPTRAIN_PYTHON`` (the Python that generated it) and, for PBS, the script to
  resubmit, ``DPTRAIN_PBS_SCRIPT``, unless the job's environment sets them (a PBS continuation
  job does), and puts the other train arguments (``--set ...``) in front of the script's own, every
  value quoted with :func:`shlex.quote`. The job then runs
  ``dptrain train --config C --out O --resume auto ARGS``, as the template does.

    job = BatchJob("slurm", nodes=2, ranks_per_node=4, time="01:00:00", config="configs/digits_mlp.toml",
                   out="runs/x", train_args=("--set", "train.epochs=50"))
    text = render(find_template("slurm").read_text(), job)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dptrain._version import __version__
from dptrain.errors import UserError

SCHEDULERS = ("slurm", "pbs")
TEMPLATE_NAMES = {"slurm": "slurm.sbatch", "pbs": "pbs.sh"}
SUBMITTERS = {"slurm": "sbatch", "pbs": "qsub"}
TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data; the repository's launch/ links here
#: The template's default run folder, used when no --out is given (stable across a requeue).
DEFAULT_OUT = {"slurm": "runs/slurm-$SLURM_JOB_ID", "pbs": "runs/pbs-$PBS_JOBID"}
SUBMIT_TIMEOUT = 120  # seconds for sbatch/qsub to answer
_TIME = re.compile(r"(\d{1,4}):([0-5]\d):([0-5]\d)")
_JOB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]{0,63}")
#: The line the inserted block goes before (the template reads the config there).
_ANCHOR = re.compile(r"^config=\$\{DPTRAIN_CONFIG-", re.M)
_SIGNAL_LEAD = re.compile(r"^#SBATCH --signal=\S*@(\d+)", re.M)


@dataclass(frozen=True)
class BatchJob:
    """One batch job: where it runs, and the ``dptrain train`` arguments it runs with."""

    scheduler: str  # slurm | pbs
    nodes: int
    ranks_per_node: int
    time: str  # HH:MM:SS
    job_name: str = "dptrain"
    config: str | None = None  # None: the built-in default
    out: str | None = None  # None: the template's default, runs/slurm-<job id> or runs/pbs-<job id>
    train_args: tuple[str, ...] = ()  # the other `dptrain train` arguments (--set ..., --comm ...)
    python: str | None = None  # DPTRAIN_PYTHON unless the job's environment sets it; None: the template's choice
    script_path: str | None = None  # where the script is saved: PBS resubmits it after a checkpoint


# ---------------------------------------------------------------------------------------------
# Checking the options

def check_scheduler(text: str) -> str:
    if text not in SCHEDULERS:
        raise UserError(f"--scheduler {text}: expected {' or '.join(SCHEDULERS)}")
    return text


def parse_count(option: str, text: str) -> int:
    """``--nodes 2`` -> 2; a UserError naming the option for anything but an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{option} {text}: expected an integer >= 1") from None
    if value < 1:
        raise UserError(f"{option} {text}: must be >= 1")
    return value


def parse_time(text: str) -> int:
    """``"01:30:00"`` -> 5400 seconds; HH may exceed 24 (``"48:00:00"``)."""
    match = _TIME.fullmatch(text)
    if not match:
        raise UserError(f"--time {text}: expected HH:MM:SS, e.g. 01:30:00")
    h, m, s = (int(g) for g in match.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds == 0:
        raise UserError(f"--time {text}: must be longer than 0")
    return seconds


def check_job_name(text: str) -> str:
    if not _JOB_NAME.fullmatch(text):
        raise UserError(f"--job-name {text}: expected a letter, then up to 63 letters, digits or _ . + - "
                        f"(what both Slurm and PBS accept)")
    return text


def find_template(scheduler: str, explicit: str | None = None) -> Path:
    """``explicit``, else the template shipped with dptrain (``dptrain/launch/templates/``, the
    repository's ``launch/``)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--template {explicit}: not found")
        return path
    path = TEMPLATES / TEMPLATE_NAMES[scheduler]
    if not path.is_file():  # pragma: no cover - a broken installation
        raise UserError(f"no {path.name} template in {TEMPLATES}: reinstall dptrain, or pass --template FILE")
    return path


def find_submitter(scheduler: str, environ: Mapping[str, str] | None = None) -> str:
    """The sbatch or qsub on PATH."""
    env = os.environ if environ is None else environ
    name = SUBMITTERS[scheduler]
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise UserError(f"--submit: {name} not found on PATH (not a {scheduler} login node?); "
                        f"use --print or --script-out FILE and submit the script yourself")
    return found


# ---------------------------------------------------------------------------------------------
# The script

def _replace_line(text: str, prefix: str, line: str, template: str) -> str:
    """Replace the one line of ``text`` that starts with ``prefix``."""
    pattern = re.compile(rf"^{re.escape(prefix)}.*$", re.M)
    found = len(pattern.findall(text))
    if found != 1:
        raise UserError(f"template {template}: expected one line starting with {prefix!r}, found {found}")
    return pattern.sub(lambda _: line, text)


def resource_lines(job: BatchJob) -> list[tuple[str, str]]:
    """(the prefix of the template's line, the line replacing it)."""
    if job.scheduler == "slurm":
        return [("#SBATCH --job-name=", f"#SBATCH --job-name={job.job_name}"),
                ("#SBATCH --nodes=", f"#SBATCH --nodes={job.nodes}"),
                ("#SBATCH --ntasks-per-node=", f"#SBATCH --ntasks-per-node={job.ranks_per_node}"),
                ("#SBATCH --time=", f"#SBATCH --time={job.time}")]
    k = job.ranks_per_node
    return [("#PBS -N ", f"#PBS -N {job.job_name}"),
            ("#PBS -l select=", f"#PBS -l select={job.nodes}:ncpus={k}:mpiprocs={k}"),
            ("#PBS -l walltime=", f"#PBS -l walltime={job.time}")]


def train_command(job: BatchJob) -> str:
    """What every start of the job runs, as shell words (the template's default run folder unquoted)."""
    config = ["--config", job.config] if job.config is not None else []
    out = shlex.quote(job.out) if job.out is not None else DEFAULT_OUT[job.scheduler]
    return " ".join([shlex.join(["dptrain", "train", *config, "--out"]), out,
                     shlex.join(["--resume", "auto", *job.train_args])]).rstrip()


def _comment(text: str) -> str:
    """``text`` as comment lines: a line break in a value cannot end the comment."""
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines())


def _default(name: str, value: str, empty_means_unset: bool) -> str:
    test = f'"${{{name}:-}}"' if empty_means_unset else f'"${{{name}+set}}"'
    return f"if [[ -z {test} ]]; then\n    {name}={shlex.quote(value)}\nfi"


def baked_block(job: BatchJob) -> str:
    """The lines inserted before the template reads DPTRAIN_CONFIG."""
    if job.scheduler == "pbs":
        why = ("(a variable set in the job's environment wins: the\n"
               "continuation job submitted after a checkpoint sets DPTRAIN_CONFIG to the run's resolved config\n"
               "and DPTRAIN_OUT to its run folder). The job runs")
    else:
        why = "(a variable set in the job's environment wins).\nEvery start of the job, a requeued one too, runs"
    lines = [_comment(f"Set by `dptrain launch --scheduler {job.scheduler}` {why}\n  {train_command(job)}\n"
                      f"and then the arguments given to the script, if any (a later --config or --out wins).")]
    # DPTRAIN_CONFIG empty: the template passes no --config, dptrain trains its built-in default.
    lines.append(_default("DPTRAIN_CONFIG", job.config or "", empty_means_unset=False))
    if job.out is not None:
        lines.append(_default("DPTRAIN_OUT", job.out, empty_means_unset=True))
    if job.python is not None:
        lines.append(_default("DPTRAIN_PYTHON", job.python, empty_means_unset=True))
    if job.scheduler == "pbs" and job.script_path is not None:
        lines.append(_default("DPTRAIN_PBS_SCRIPT", job.script_path, empty_means_unset=True))
    if job.train_args:
        lines.append(f'set -- {shlex.join(job.train_args)} "$@"')
    return "\n".join(lines) + "\n\n"


def render(template_text: str, job: BatchJob, template_name: str = "") -> str:
    """The batch script of ``job`` made from ``template_text`` (see the module docstring)."""
    template_name = template_name or TEMPLATE_NAMES[job.scheduler]
    first, sep, rest = template_text.partition("\n")
    if not first.startswith("#!") or not sep:
        raise UserError(f"template {template_name}: does not start with a #! line")
    for prefix, line in resource_lines(job):
        rest = _replace_line(rest, prefix, line, template_name)
    warning = _SIGNAL_LEAD.search(rest) if job.scheduler == "slurm" else None
    if warning and parse_time(job.time) <= int(warning.group(1)):
        raise UserError(f"--time {job.time}: must be longer than the {warning.group(1)} s before the limit at "
                        f"which Slurm asks the job to checkpoint ({warning.group(0)})")
    anchors = _ANCHOR.findall(rest)
    if len(anchors) != 1:
        raise UserError(f"template {template_name}: expected one line starting with 'config=${{DPTRAIN_CONFIG-', "
                        f"found {len(anchors)}")
    at = _ANCHOR.search(rest).start()
    rest = rest[:at] + baked_block(job) + rest[at:]
    header = _comment(f"Generated by `dptrain launch --scheduler {job.scheduler}` (dptrain {__version__}) from "
                      f"{template_name}: {job.nodes} node(s) x {job.ranks_per_node} rank(s), time limit {job.time}.")
    return f"{first}\n{header}\n{rest}"


def default_script_path(scheduler: str, job_name: str, folder: Path = Path("runs") / "jobs") -> Path:
    """``runs/jobs/<job name>-<date-time>.sbatch`` (or ``.sh``), not yet taken."""
    suffix = Path(TEMPLATE_NAMES[scheduler]).suffix
    base = f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = folder / f"{base}{suffix}", 1
    while path.exists():
        i += 1
        path = folder / f"{base}-{i}{suffix}"
    return path


def write_script(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders created), executable like the templates."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        mode = path.stat().st_mode
        path.chmod(mode | (mode & 0o444) >> 2)  # executable wherever readable
    except OSError as exc:
        raise UserError(f"--script-out {path}: cannot be written ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# Submitting

def submit_script(scheduler: str, submitter: str, script: Path, environ: Mapping[str, str] | None = None) -> str:
    """Run ``sbatch SCRIPT`` / ``qsub SCRIPT`` in the current folder (the job's working folder) and
    return the job id it prints. DPTRAIN_CONFIG and DPTRAIN_OUT are left out of the environment
    sbatch exports, so that the job runs what the script says."""
    env = dict(os.environ if environ is None else environ)
    for name in ("DPTRAIN_CONFIG", "DPTRAIN_OUT"):
        env.pop(name, None)
    name = Path(submitter).name
    try:
        proc = subprocess.run([submitter, str(script)], capture_output=True, text=True, env=env,
                              timeout=SUBMIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"{name} {script}: no answer within {SUBMIT_TIMEOUT} s") from None
    except OSError as exc:
        raise UserError(f"{name} {script}: cannot be run ({exc.strerror or exc})") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"{name} {script}: failed with exit status {proc.returncode}"
                        + (f": {said[-1]}" if said else ""))
    return parse_job_id(scheduler, proc.stdout, f"{name} {script}")


def parse_job_id(scheduler: str, stdout: str, what: str) -> str:
    """The id in sbatch's ``Submitted batch job 123`` (or ``--parsable``'s ``123;cluster``), or
    the last line qsub prints (``1234.server``)."""
    if scheduler == "slurm":
        match = re.search(r"Submitted batch job (\S+)", stdout)
        if match:
            return match.group(1)
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what}: printed no job id")
    return lines[-1].split(";")[0] if scheduler == "slurm" else lines[-1]
