"""The one exception type the CLI reports as a clean message instead of a traceback."""


class SmallCapError(Exception):
    """A problem with the user's input or environment, worded for the user (file, reason, fix)."""
