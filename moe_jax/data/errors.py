"""Errors the data layer raises for conditions a user can fix without reading a traceback."""


class DatasetUnavailableError(RuntimeError):
    """A dataset is missing, too small or unprepared.

    The message is one line that says what was found, where, and what to do instead, so the trainer can print
    it and exit with status 2.
    """
