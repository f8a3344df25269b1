"""The README's Python API example runs as written, alone and under mpiexec."""

from __future__ import annotations

import re
import sys

import pytest

from helpers import MPI_MARKS, MPIEXEC, REPO, run


def _api_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


@pytest.mark.parametrize("ranks", [None, pytest.param(2, marks=MPI_MARKS)])
def test_api_example_runs(tmp_path, ranks):
    script = tmp_path / "example.py"
    script.write_text(_api_example())
    argv = [sys.executable, str(script)]
    if ranks:
        argv = [MPIEXEC, "-n", str(ranks), *argv]
    result = run(argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split("val_accuracy")[1])
    assert accuracy > 0.95
    assert (tmp_path / "runs" / "api" / "checkpoints" / "latest" / "model.npz").is_file()
