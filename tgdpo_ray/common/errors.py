"""The base of every error that the CLI prints as one clear message, without a traceback."""


class UserError(Exception):
    """Bad input or environment (a config key, a file, a row, a model path, a failed run): the message names it."""
