"""The exceptions edgegw raises on purpose. Each carries enough to tell the operator what to fix."""

from __future__ import annotations


class EdgegwError(Exception):
    """Base of every error edgegw raises for the operator (not for bugs)."""


class ConfigError(EdgegwError):
    """A configuration value is missing, unknown or invalid. ``key`` is its dotted name, e.g. ``mqtt.port``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class OutboxError(EdgegwError):
    """The outbox file cannot be opened, written or is corrupt; the message names the file."""


class PKIError(EdgegwError):
    """Certificate material cannot be created or loaded; the message names the file or id."""
