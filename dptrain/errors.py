"""Exceptions the CLI turns into exit statuses."""


class UserError(Exception):
    """Bad input (config, data file, option): shown as one line, exit status 2, nothing written."""

    exit_code = 2


class ExitQuietly(Exception):
    """Exit with ``code`` without printing: the reason was already printed (e.g. by another rank)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
