"""`ruff check` is clean (its rules are in pyproject.toml): the suite fails on a lint error."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_ruff_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
