"""The command line: one module per command, shared options in :mod:`.options`, the group in :mod:`.main`.
A thin face: each command parses its options and calls :mod:`dptrain.app`."""

from .main import main

__all__ = ["main"]
