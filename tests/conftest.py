"""Shared test set-up: the `mpi` mark, the helpers module (tests/helpers.py) on the import path, the `jobs` fixture.

    pytest                 # everything (the README's test command)
    pytest -m "not mpi and not slow"    # the fast loop: no test that starts mpiexec or runs for seconds
"""

from __future__ import annotations

from pathlib import Path

import pytest
from background import Jobs

import helpers


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: runs mpiexec (leave out with -m \"not mpi\" for a fast loop)")
    config.addinivalue_line("markers", "slow: starts a process that runs for seconds: an example, a wheel build, a "
                            "fault (leave out with -m \"not slow\" for a fast loop)")


@pytest.fixture(autouse=True)
def _mpi_mark_checked(request):
    """helpers.run() refuses to start mpiexec in a test without the mpi mark, so the fast loop stays MPI-free."""
    helpers.current_test_is_mpi = request.node.get_closest_marker("mpi") is not None
    yield
    helpers.current_test_is_mpi = True


@pytest.fixture
def jobs(tmp_path: Path):
    """Start jobs in the background (``jobs.start``); whatever is left of them is killed at teardown."""
    registry = Jobs(tmp_path)
    yield registry
    registry.cleanup()
