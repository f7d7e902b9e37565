"""Errors that a stage reports to the user as one clear message instead of a traceback."""


class StageError(Exception):
    """A failure caused by input, configuration or the environment.

    The message names the offending value and says how to fix it. The command line
    prints it without a traceback and exits with status 2.
    """


class ConfigError(StageError):
    """An invalid stage option or configuration file."""
