"""User-facing errors: every one names the problem and, where it can, what to do next.

The CLI prints them as `error: <message>` and exits with status 2, never with a traceback.
"""


class HpeftError(Exception):
    """Base class for errors caused by user input (bad config, checkpoint, data, backbone)."""


class ConfigError(HpeftError, ValueError):
    """A method or preset configuration is invalid (names the field and the allowed values)."""


class CheckpointError(HpeftError):
    """A checkpoint is missing, corrupt, or does not match the model or backbone it is loaded into."""


class DataError(HpeftError):
    """A task or data file cannot be found or read."""


class BackboneError(HpeftError):
    """A backbone cannot be found, read, or is not of a supported architecture."""
