"""The one exception the entry script reports as a single line without a traceback."""


class UsageError(Exception):
    """Bad flags, paths or data given by the user, or a run directory that cannot take what the run writes (a full
    disk): the message says what and where."""
