"""The error a wrong setting raises: the command line reports it in one line, without a traceback."""


class ConfigError(ValueError):
    """A setting (model, optimizer, schedule, data) is invalid; the message names it and the fix."""
