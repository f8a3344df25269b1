"""The package version: a leaf that every module may import (pyproject.toml reads it too)."""

__version__ = "0.1.0"
