"""Exceptions the CLI turns into exit statuses.

Exit statuses of ``dptrain train``: 0 done; 1 a crash (a rank's traceback is printed, the job
aborted); 2 bad input; 3 the run diverged or the ranks went out of sync; 74 the environment failed (a
full disk, a permission, a file where a folder should be: one line naming the path); 75 stopped by a
signal after writing a checkpoint: requeue the job with ``--resume auto``; 124 a rank waited in a
collective longer than ``comm.timeout_s`` (or a stop signal was not honoured within it): the watchdog
named the ranks that did not arrive and ended the job.
"""

EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_ENVIRONMENT = 74  # EX_IOERR from sysexits.h: an input/output error
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_TIMEOUT = 124  # as timeout(1): the watchdog ended a job that stopped making progress


# Every character str.splitlines() breaks at, escaped as Python would write it.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """A message fit for one line of a log: line breaks in user-given names are escaped."""
    return text.translate(_LINE_BREAKS)


def environment_message(exc: OSError) -> str:
    """One line for an OSError the environment raised: the path(s) and the cause, e.g.
    "runs/x/config.toml: No space left on device (a failure of the environment: ...)"."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    cause = exc.strerror or str(exc) or type(exc).__name__
    return one_line(f"{paths + ': ' if paths else ''}{cause} (a failure of the environment: disk, permissions or "
                    f"file system)")


class UserError(Exception):
    """Bad input (config, data file, option): shown as one line, exit status 2, nothing written."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


class ExitQuietly(Exception):
    """Exit with ``code`` without printing: the reason was already printed (e.g. by another rank)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class CollectiveError(Exception):
    """An error every rank raises at the same point of the run, from the same agreed data.

    Nobody is left waiting in a collective, so the job ends cleanly: rank 0 prints the message,
    every rank exits with ``exit_code``.
    """

    exit_code = EXIT_TRAINING_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


class DivergenceError(CollectiveError):
    """A NaN or infinite loss or gradient."""


class DesyncError(CollectiveError):
    """The ranks' parameters differ, or the ranks made different collective calls.

    ``details``: every rank's last collectives (the flight recorder), a few lines to print before the error.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class MismatchError(CollectiveError):
    """The ranks disagree on the config, the data or the model before step 0."""

    exit_code = EXIT_BAD_INPUT
