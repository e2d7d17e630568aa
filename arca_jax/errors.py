"""The project's error hierarchy.

Every error that bad input causes (a config, a model's config.json, a checkpoint, a task's data, a
run directory) is a `ConfigError`: the command line prints its one-line message and exits 2.
"""


class ConfigError(ValueError):
    """Bad input: a config value, a model config, a checkpoint, a data file or a run directory."""
