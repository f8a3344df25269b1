"""The configuration reference is generated from the schema, covers every key, and is committed fresh."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import get_type_hints

from click.testing import CliRunner

from dptrain.cli import main
from dptrain.config import Config
from dptrain.config.layers import layer_tables
from dptrain.config.reference import field_comments, reference_markdown

from helpers import REPO


def test_the_committed_reference_is_what_the_schema_generates():
    committed = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/config-reference.md is stale: run `dptrain config reference > docs/config-reference.md`")


def test_every_key_is_documented():
    """A new config key needs a comment beside it in dptrain/config/schema.py: the reference's meaning column."""
    hints = get_type_hints(Config)
    sections = [(Config, "")] + [(hints[f.name], f"{f.name}.") for f in fields(Config) if is_dataclass(hints[f.name])]
    undocumented = [prefix + f.name for cls, prefix in sections for f in fields(cls)
                    if not is_dataclass(get_type_hints(cls)[f.name]) and not field_comments(cls).get(f.name)]
    assert not undocumented, f"keys without a comment in schema.py: {undocumented}"
    text = reference_markdown()
    for cls, prefix in sections:
        for f in fields(cls):
            if not is_dataclass(get_type_hints(cls)[f.name]):
                assert f"| `{prefix}{f.name}` |" in text
    for kind in layer_tables():
        assert f"| `{kind}` |" in text


def test_config_reference_command_prints_it():
    result = CliRunner().invoke(main, ["config", "reference"])
    assert result.exit_code == 0 and result.output == reference_markdown()
