"""The project's error hierarchy.

Every error that bad input causes (a config, a model's config.json, a checkpoint, a task's data, a
run directory) is a `ConfigError`: the command line prints its one-line message and exits 2.
"""


import json
from typing import Any, Type


class ConfigError(ValueError):
    """Bad input: a config value, a model config, a checkpoint, a data file or a run directory."""


def read_json(path: str, error: Type[ConfigError] = ConfigError) -> Any:
    """The parsed JSON file at `path`; a file that is not valid JSON raises `error` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
