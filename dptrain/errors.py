"""Exceptions the CLI turns into exit statuses.

Exit statuses of ``dptrain train``: 0 done; 1 a crash (a rank's traceback is printed, the job
aborted); 2 bad input; 3 the run diverged or the ranks went out of sync; 75 stopped by a signal
after writing a checkpoint: requeue the job with ``--resume auto``.
"""

EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class UserError(Exception):
    """Bad input (config, data file, option): shown as one line, exit status 2, nothing written."""

    exit_code = EXIT_BAD_INPUT


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


class DivergenceError(CollectiveError):
    """A NaN or infinite loss or gradient."""


class DesyncError(CollectiveError):
    """The ranks' parameters differ."""


class MismatchError(CollectiveError):
    """The ranks disagree on the config, the data or the model before step 0."""

    exit_code = EXIT_BAD_INPUT
