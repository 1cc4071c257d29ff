"""The error of a configuration that cannot be used: it names the dotted key at fault."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""
