"""The run's configuration: a typed schema of frozen dataclasses (:mod:`.schema`), loaded from TOML
or a built-in config's name with ``--set`` overrides (:mod:`.loading`), checked (:mod:`.validation`),
and the ``model.layers`` tables (:mod:`.layers`). Errors name the file and the key."""

from .loading import builtin_configs, config_from_dict, load_config, parse_override
from .schema import Config, replace, to_toml
from .validation import validate

__all__ = ["Config", "builtin_configs", "config_from_dict", "load_config", "parse_override", "replace", "to_toml",
           "validate"]
