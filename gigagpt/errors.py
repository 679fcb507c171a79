"""The error a wrong setting raises: the command line reports it in one line, without a traceback."""


class ConfigError(ValueError):
    """A setting (model, optimizer, schedule, data) is invalid; the message names it and the fix."""


class ConversionError(ValueError):
    """A model cannot be represented in the target format; the message says why and what to do."""
