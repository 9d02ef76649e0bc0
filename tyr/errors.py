"""The one error type for user mistakes (bad config, bad paths, bad data).

The CLI prints its message on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class TyrError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""
