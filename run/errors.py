"""The one exception the entry script reports as a single line without a traceback."""


class UsageError(Exception):
    """Bad flags, paths or data given by the user: the message says what and where."""
