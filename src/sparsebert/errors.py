"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class SparseBertError(Exception):
    """A problem with the user's input (files, options, models) that a one-line message explains."""
