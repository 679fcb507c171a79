"""gigagpt's errors: every one derives from :class:`GigagptError`, which the ``gigagpt`` command
reports as one ``gigagpt: ...`` line, without a traceback."""


class GigagptError(Exception):
    """The root of every error gigagpt raises on purpose; its message names the setting or file and the fix."""


class ConfigError(GigagptError, ValueError):
    """A setting (model, optimizer, schedule, data) is invalid; the message names it and the fix."""


class ConversionError(GigagptError, ValueError):
    """A model cannot be represented in the target format; the message says why and what to do."""
