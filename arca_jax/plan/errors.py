"""The plan's one error type."""

from arca_jax.errors import ConfigError


class PlanError(ConfigError):
    """Input plan cannot work with (unknown topology, no libtpu, a mesh that does not divide)."""
