"""What the CLI turns into one line and an exit status: a user error, or a run stopped at a checkpoint."""


class SparseBertError(Exception):
    """A problem with the user's input (files, options, models) that a one-line message explains."""


class StoppedAtCheckpoint(KeyboardInterrupt):
    """Ctrl-C / SIGTERM honoured at a step boundary, after a checkpoint was written (``--resume`` continues)."""
